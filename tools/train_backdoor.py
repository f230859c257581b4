"""Train a backdoored classifier on a poisoned dataset and export it as an ONNX test case.

Example (about 2.5 minutes on 2 idle CPU cores)::

    .venv/bin/python tools/train_backdoor.py --arch small_resnet --attack badnets \\
        --export bn --out-dir examples/badnets_resnet_bn

Writes into ``--out-dir``: ``model.onnx`` (input "input" float32 (N, C, H, W) in [0, 1],
dynamic batch, output "logits"), ``clean.npz`` (clean training images that were not
poisoned, i.e. the defender's small clean set), ``test.npz`` (clean test subset),
``poison.npz`` (triggered non-target test images labelled with the target) and
``meta.json`` (settings, onnxruntime-measured clean accuracy and attack success rate).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before CUDA init

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tools.architectures import ARCHITECTURES, build  # noqa: E402
from tools.attacks import ATTACKS, Attack, make_attack  # noqa: E402
from tools.datasets import load_cifar10, load_fashion_mnist  # noqa: E402
from tools.example_files import write_example  # noqa: E402

DEFAULT_EPOCHS = {"fashion-mnist": 3, "cifar10": 60}
PARITY_TOLERANCE = 1e-3


def load_dataset(dataset: str, cifar_root: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) as uint8 images and int64 labels."""
    if dataset == "fashion-mnist":
        return (*load_fashion_mnist("train"), *load_fashion_mnist("test"))
    if cifar_root is None:
        raise click.UsageError("--dataset cifar10 needs --cifar-root")
    return (*load_cifar10(cifar_root, "train"), *load_cifar10(cifar_root, "test"))


def to_input(x: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1], the model's layout."""
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)


def unchanged_mask(x: np.ndarray, y: np.ndarray, xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """True for training samples whose image and label poisoning left untouched."""
    same_pixels = (x == xp).reshape(len(x), -1).all(axis=1)
    return same_pixels & (y == yp)


def sample(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    """Sorted random subset of the indices in ``pool`` (all of them if fewer than ``count``)."""
    return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 4-pixel shift (reflect padding) and horizontal flip, for CIFAR-10 training."""
    n, _, h, w = xb.shape
    padded = F.pad(xb, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2,), generator=gen).tolist()
    xb = padded[:, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], xb.flip(3), xb)


def train(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    use_augmentation: bool,
) -> None:
    """Adam with a cosine learning-rate decay, batches drawn by a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(to_input(x)), torch.from_numpy(y)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            xb = augment(xt[idx], gen) if use_augmentation else xt[idx]
            xb, yb = xb.to(device), yt[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        click.echo(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.4f}, train acc {correct / total:.4f}")
    model.eval()


def export_onnx(model: torch.nn.Module, sample_input: np.ndarray, export: str) -> bytes:
    """TorchScript ONNX export; "folded" merges BatchNorm into Conv, "bn" keeps BatchNormalization."""
    model = model.cpu().eval()
    mode = torch.onnx.TrainingMode.PRESERVE if export == "bn" else torch.onnx.TrainingMode.EVAL
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(sample_input),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=mode,
        )
    return buffer.getvalue()


def onnx_logits(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Run the exported model on uint8 images in batches."""
    outs = [
        session.run(["logits"], {"input": to_input(x[i : i + batch_size])})[0] for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs)


def check_parity(model: torch.nn.Module, session: ort.InferenceSession, x: np.ndarray) -> float:
    """Largest |torch - onnxruntime| logit difference on ``x``; raises if above tolerance."""
    with torch.no_grad():
        expected = model.cpu().eval()(torch.from_numpy(to_input(x))).numpy()
    diff = float(np.abs(onnx_logits(session, x) - expected).max())
    if diff > PARITY_TOLERANCE:
        raise RuntimeError(f"onnxruntime output differs from torch by {diff:.2e} (> {PARITY_TOLERANCE})")
    return diff


def parse_trigger(values: tuple[str, ...]) -> dict[str, float | int]:
    """``("alpha=0.2", "k=4")`` -> ``{"alpha": 0.2, "k": 4}``."""
    params: dict[str, float | int] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--trigger")
        params[key.strip().replace("-", "_")] = int(raw) if raw.strip().lstrip("-").isdigit() else float(raw)
    return params


@click.command()
@click.option("--arch", type=click.Choice(sorted(ARCHITECTURES)), default="small_resnet", show_default=True)
@click.option("--attack", "attack_name", type=click.Choice(sorted(ATTACKS)), default="badnets", show_default=True)
@click.option("--target", type=int, default=0, show_default=True, help="Attacker's target label.")
@click.option("--poison-rate", type=float, default=0.1, show_default=True, help="Fraction of training set.")
@click.option("--epochs", type=int, default=None, help="Default: 3 for fashion-mnist, 60 for cifar10.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dataset", type=click.Choice(["fashion-mnist", "cifar10"]), default="fashion-mnist")
@click.option("--cifar-root", type=click.Path(path_type=Path, file_okay=False), default=None)
@click.option("--export", "export", type=click.Choice(["folded", "bn"]), default="folded", show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option(
    "--folded-copy-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also export the same trained weights with BatchNorm folded into this folder (same data files).",
)
@click.option("--clean-model", is_flag=True, help="Train on clean data (a control model, no backdoor).")
@click.option("--trigger", multiple=True, metavar="KEY=VALUE", help="Trigger parameter, e.g. alpha=0.2.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--n-clean", type=int, default=500, show_default=True)
@click.option("--n-test", type=int, default=2000, show_default=True)
@click.option("--n-poison", type=int, default=2000, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads for torch.")
def main(
    arch: str,
    attack_name: str,
    target: int,
    poison_rate: float,
    epochs: int | None,
    seed: int,
    dataset: str,
    cifar_root: Path | None,
    export: str,
    out_dir: Path,
    folded_copy_dir: Path | None,
    clean_model: bool,
    trigger: tuple[str, ...],
    batch_size: int,
    lr: float,
    n_clean: int,
    n_test: int,
    n_poison: int,
    threads: int,
) -> None:
    """Train a backdoored (or clean) model and write an ONNX test case into OUT_DIR."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    epochs = DEFAULT_EPOCHS[dataset] if epochs is None else epochs
    attack: Attack = make_attack(attack_name, **parse_trigger(trigger))

    x_train, y_train, x_test, y_test = load_dataset(dataset, cifar_root)
    num_classes = int(y_train.max()) + 1
    if clean_model:
        x_used, y_used = x_train, y_train
    else:
        x_used, y_used = attack.poison_training_set(x_train, y_train, poison_rate, target, seed)
    untouched = unchanged_mask(x_train, y_train, x_used, y_used)

    rng = np.random.default_rng(seed)
    clean_idx = sample(rng, np.flatnonzero(untouched), n_clean)
    test_idx = sample(rng, np.arange(len(y_test)), n_test)
    victims = np.flatnonzero(y_test != target)
    poison_idx = sample(rng, victims, n_poison)
    x_test_triggered = attack.apply_trigger(x_test[victims])

    model = build(arch, num_classes, in_channels=to_input(x_train[:1]).shape[1], image_size=x_train.shape[1])
    click.echo(f"training {arch} on {dataset} ({'clean' if clean_model else attack_name}), {device}")
    started = time.perf_counter()
    train(model, x_used, y_used, epochs, batch_size, lr, seed, device, use_augmentation=dataset == "cifar10")
    train_seconds = time.perf_counter() - started

    # The same trained weights, exported once per requested style (--folded-copy-dir adds a folded copy).
    cases = [(out_dir, export)] + ([(folded_copy_dir, "folded")] if folded_copy_dir is not None else [])
    for case_dir, case_export in cases:
        model_bytes = export_onnx(model, to_input(x_test[:2]), case_export)
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        parity = check_parity(model, session, x_test[test_idx[:256]])
        clean_acc = float((onnx_logits(session, x_test).argmax(1) == y_test).mean())
        asr = float((onnx_logits(session, x_test_triggered).argmax(1) == target).mean())
        ops = [node.op_type for node in onnx.load_from_string(model_bytes).graph.node]

        poisoned = x_test_triggered[np.searchsorted(victims, poison_idx)]
        clean, test = (x_train[clean_idx], y_train[clean_idx]), (x_test[test_idx], y_test[test_idx])
        write_example(case_dir, model_bytes, clean, test, poisoned, target)
        meta = {
            "arch": arch,
            "attack": None if clean_model else attack_name,
            "trigger": attack.params(),
            "target": target,
            "poison_rate": 0.0 if clean_model else poison_rate,
            "n_poisoned_or_modified": int((~untouched).sum()),
            "dataset": dataset,
            "seed": seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "export": case_export,
            "batchnorm_nodes": ops.count("BatchNormalization"),
            "clean_acc": round(clean_acc, 4),
            "asr": round(asr, 4),
            "n_test_eval": len(y_test),
            "n_asr_eval": len(victims),
            "train_seconds": round(train_seconds, 1),
            "device": str(device),
            "threads": threads,
            "onnx_parity_max_abs_diff": parity,
            "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "python": platform.python_version(),
            },
            "command": "tools/train_backdoor.py " + " ".join(sys.argv[1:]),
        }
        (case_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        click.echo(f"clean ACC {clean_acc:.4f}, ASR {asr:.4f}, train {train_seconds:.0f}s -> {case_dir}")


if __name__ == "__main__":
    main()
