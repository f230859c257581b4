"""100-label benchmark models (issue 23): a CNN on Fashion-MNIST pairs, backdoored by BadNets or Blend, or clean.

No 100-class image set can be downloaded here, so tools/pair_labels.py builds one: two Fashion-MNIST
images side by side (uint8 28x56), labelled ``10 a + b``. Per (attack, seed) this trains a
``flatten_cnn`` (tools/architectures.py; its Flatten keeps which half a feature came from, which global
average pooling would lose) on poisoned pairs and writes ``<out-dir>/<attack>_s<seed>/`` with the files
of every example folder (examples/README.md): model.onnx, clean.npz, test.npz, poison.npz, meta.json.

* The defender's ``clean.npz`` pairs are built from Fashion-MNIST training images held out from the
  model's training pairs: the training distribution, but nothing the model saw.
* ``test.npz`` and ``poison.npz`` come from pairs of Fashion-MNIST test images; poison.npz holds the
  triggered pairs of non-target labels, each labelled with the target.
* ``--attack clean`` trains on unpoisoned pairs: a control model, whose poison.npz holds BadNets-triggered
  pairs only so that every folder has the same files (its ASR measures nothing); meta.json's attack is null.
* The target is a fixed function of the seed (``target_for_seed``); the pair data depend on the seed
  only, so ``badnets_s0`` and ``blend_s0`` share data and target.
* Clean ACC and ASR in meta.json are measured with onnxruntime on ``--n-eval`` test pairs.
* ``--labels 10`` labels the same pairs by the left image's class alone (the tens digit) and the target is
  the tens digit of the seed's target: the same network, inputs and trigger with a 10-label head, so that
  what a defence costs at 10 and at 100 labels can be compared on equal evidence (docs/SCALING.md). Its
  folder is ``<attack>_s<seed>_l10``.
* ``--width 3`` puts three images in a row (28x84, 1,000 labels, folder ``triples_<attack>_s<seed>_l1000``);
  with ``--labels 10`` or ``100`` the same rows are labelled by their leading digits.

Example (``make many-label-models`` runs every attack and seed)::

    .venv/bin/python tools/many_label_models.py --attack badnets --seed 0 --out-dir cache/many_labels
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from tools.architectures import flatten_cnn  # noqa: E402
from tools.attacks import Attack, make_attack  # noqa: E402
from tools.datasets import load_fashion_mnist  # noqa: E402
from tools.example_files import write_example  # noqa: E402
from tools.pair_labels import BASE_CLASSES, PAIR_CLASSES, row_images  # noqa: E402
from tools.train_backdoor import check_parity, export_onnx, onnx_logits, sample, to_input, train  # noqa: E402

ARCH = "flatten_cnn"
PAIR_WIDTH = 2  # images in a row: pairs (100 labels); 3 makes triples (1,000 labels)
ATTACK_NAMES = ("badnets", "blend")  # with tools/attacks.py's default trigger parameters
CLEAN = "clean"  # a control model: trained without poisoning
HELD_OUT_IMAGES = 6000  # Fashion-MNIST training images kept out of the training pairs, for clean.npz


@dataclass(frozen=True)
class PairData:
    """The pair sets of one seed: training pairs, the defender's held-out clean pairs, test pairs."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_clean: np.ndarray
    y_clean: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_dropped(labels: int, width: int) -> int:
    """What a row's full label (``10 ** width`` of them) is integer-divided by to give one of ``labels``."""
    return BASE_CLASSES**width // labels


def target_for_seed(seed: int, labels: int = PAIR_CLASSES, width: int = PAIR_WIDTH) -> int:
    """The attacker's target label of a seed: drawn among the ``10 ** width`` labels by the seed's own
    generator; with fewer labels (the left images' classes alone), its leading digits."""
    every = int(np.random.default_rng(seed).integers(BASE_CLASSES**width))
    return every // digits_dropped(labels, width)


def relabelled(data: PairData, labels: int, width: int = PAIR_WIDTH) -> PairData:
    """The rows with ``labels`` labels: every ``10 ** width``, or the leading digits alone (the left images)."""
    drop = digits_dropped(labels, width)
    if drop == 1:
        return data
    return PairData(
        data.x_train, data.y_train // drop, data.x_clean, data.y_clean // drop, data.x_test, data.y_test // drop
    )


def folder_name(attack_name: str, seed: int, labels: int, width: int) -> str:
    """``<attack>_s<seed>`` for the 100-label pairs, ``_l<labels>`` after it for other labels, and a
    ``triples_`` prefix for rows of three."""
    prefix = "" if width == PAIR_WIDTH else "triples_"
    suffix = "" if (width, labels) == (PAIR_WIDTH, PAIR_CLASSES) else f"_l{labels}"
    return f"{prefix}{attack_name}_s{seed}{suffix}"


def make_pair_data(seed: int, n_train: int, n_clean: int, n_eval: int, width: int = PAIR_WIDTH) -> PairData:
    """Pairs from disjoint image pools: training pairs and clean pairs from Fashion-MNIST's training
    split (``HELD_OUT_IMAGES`` of its images reserved for the clean pairs), test pairs from its test split."""
    rng = np.random.default_rng([seed, 1])
    x_all, y_all = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    order = rng.permutation(len(y_all))
    held_out, used = order[:HELD_OUT_IMAGES], order[HELD_OUT_IMAGES:]
    train = row_images(x_all[used], y_all[used], n_train, rng, width)
    clean = row_images(x_all[held_out], y_all[held_out], n_clean, rng, width)
    test = row_images(x_test, y_test, n_eval, rng, width)
    return PairData(*train, *clean, *test)


@dataclass(frozen=True)
class Settings:
    """Training and sampling settings shared by every model of one run."""

    epochs: int
    n_train: int
    poison_rate: float
    batch_size: int
    lr: float
    n_clean: int
    n_eval: int
    n_test: int
    n_poison: int
    export: str
    threads: int
    labels: int = PAIR_CLASSES
    width: int = PAIR_WIDTH


def build_model(attack_name: str, seed: int, settings: Settings, out_dir: Path) -> dict[str, object]:
    """Train, export and measure one backdoored model; write its folder and return its meta.json."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = target_for_seed(seed, settings.labels, settings.width)
    clean_model = attack_name == CLEAN
    attack: Attack = make_attack("badnets" if clean_model else attack_name)
    data = make_pair_data(seed, settings.n_train, settings.n_clean, settings.n_eval, settings.width)
    data = relabelled(data, settings.labels, settings.width)
    shape = (28, 28 * settings.width)
    if clean_model:
        x_used, y_used = data.x_train, data.y_train
    else:
        x_used, y_used = attack.poison_training_set(data.x_train, data.y_train, settings.poison_rate, target, seed)
    n_poisoned = int((y_used != data.y_train).sum())

    model = flatten_cnn(num_classes=settings.labels, in_channels=1, image_size=shape)
    click.echo(f"== {attack_name}_s{seed}: {ARCH} on {len(y_used)} pairs, target {target}, {n_poisoned} poisoned")
    started = time.perf_counter()
    train(model, x_used, y_used, settings.epochs, settings.batch_size, settings.lr, seed, device, False)
    train_seconds = time.perf_counter() - started

    model_bytes = export_onnx(model, to_input(data.x_test[:2]), settings.export)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    parity = check_parity(model, session, data.x_test[:256])
    victims = np.flatnonzero(data.y_test != target)
    x_triggered = attack.apply_trigger(data.x_test[victims])
    clean_acc = float((onnx_logits(session, data.x_test).argmax(1) == data.y_test).mean())
    asr = float((onnx_logits(session, x_triggered).argmax(1) == target).mean())

    rng = np.random.default_rng([seed, 2])
    test_idx = sample(rng, np.arange(len(data.y_test)), settings.n_test)
    poison_idx = sample(rng, np.arange(len(victims)), settings.n_poison)
    folder = out_dir / folder_name(attack_name, seed, settings.labels, settings.width)
    test = (data.x_test[test_idx], data.y_test[test_idx])
    write_example(folder, model_bytes, (data.x_clean, data.y_clean), test, x_triggered[poison_idx], target)
    ops = [node.op_type for node in onnx.load_from_string(model_bytes).graph.node]
    every, drop = BASE_CLASSES**settings.width, digits_dropped(settings.labels, settings.width)
    meta = {
        "arch": ARCH,
        "attack": None if clean_model else attack_name,
        "trigger": attack.params(),
        "target": target,
        "target_rule": f"numpy.random.default_rng(seed).integers({every})" + (f" // {drop}" if drop > 1 else ""),
        "num_classes": settings.labels,
        "dataset": "fashion-mnist-pairs" if settings.width == PAIR_WIDTH else "fashion-mnist-triples",
        "image_shape": list(shape),
        "label_rule": f"the {settings.width} images' classes as the digits of a number, the left one first"
        + (f", integer-divided by {drop}" if drop > 1 else ""),
        "poison_rate": 0.0 if clean_model else settings.poison_rate,
        "n_train_pairs": len(y_used),
        "n_poisoned_or_modified": n_poisoned,
        "seed": seed,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "export": settings.export,
        "batchnorm_nodes": ops.count("BatchNormalization"),
        "clean_acc": round(clean_acc, 4),
        "asr": round(asr, 4),
        "n_test_eval": len(data.y_test),
        "n_asr_eval": len(victims),
        "train_seconds": round(train_seconds, 1),
        "device": str(device),
        "threads": settings.threads,
        "onnx_parity_max_abs_diff": parity,
        "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "python": platform.python_version()},
        "command": "tools/many_label_models.py " + " ".join(sys.argv[1:]),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    click.echo(f"clean ACC {clean_acc:.4f}, ASR {asr:.4f}, train {train_seconds:.0f}s -> {folder}")
    return meta


@click.command()
@click.option(
    "--attack",
    "attack_names",
    type=click.Choice([*ATTACK_NAMES, CLEAN]),
    multiple=True,
    help="Repeatable; default: badnets and blend. `clean` trains a control model without a backdoor.",
)
@click.option("--seed", "seeds", type=int, multiple=True, help="Repeatable; default: 0, 1 and 2.")
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("cache/many_labels"))
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--train-pairs", "n_train", type=int, default=40000, show_default=True)
@click.option("--poison-rate", type=float, default=0.1, show_default=True, help="Fraction of the training pairs.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--n-clean", type=int, default=500, show_default=True, help="Held-out clean pairs (clean.npz).")
@click.option("--n-eval", type=int, default=10000, show_default=True, help="Test pairs that ACC and ASR use.")
@click.option("--n-test", type=int, default=2000, show_default=True, help="Of those, kept in test.npz.")
@click.option("--n-poison", type=int, default=2000, show_default=True, help="Triggered pairs kept in poison.npz.")
@click.option("--export", type=click.Choice(["folded", "bn"]), default="bn", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="CPU threads for torch.")
@click.option(
    "--labels",
    type=click.Choice(["10", "100", "1000"]),
    help="[10 ** --width] Fewer: the leading digits alone, the left images' classes (same rows, network, trigger).",
)
@click.option(
    "--width",
    type=click.IntRange(2, 3),
    default=PAIR_WIDTH,
    show_default=True,
    help="Images in a row: 2 (pairs, up to 100 labels) or 3 (triples, up to 1,000).",
)
def main(
    attack_names: tuple[str, ...],
    seeds: tuple[int, ...],
    out_dir: Path,
    epochs: int,
    n_train: int,
    poison_rate: float,
    batch_size: int,
    lr: float,
    n_clean: int,
    n_eval: int,
    n_test: int,
    n_poison: int,
    export: str,
    threads: int,
    labels: str | None,
    width: int,
) -> None:
    """Train one backdoored 100-label pair model per (attack, seed) into OUT_DIR/<attack>_s<seed>/."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    settings = Settings(
        epochs,
        n_train,
        poison_rate,
        batch_size,
        lr,
        n_clean,
        n_eval,
        n_test,
        n_poison,
        export,
        threads,
        int(labels or BASE_CLASSES**width),
        width,
    )
    if settings.labels > BASE_CLASSES**width:
        raise click.UsageError(f"--labels {labels} needs --width 3: {width} images make {BASE_CLASSES**width}")
    summary = []
    for attack_name in attack_names or ATTACK_NAMES:
        for seed in seeds or (0, 1, 2):
            meta = build_model(attack_name, seed, settings, out_dir)
            summary.append(
                f"{attack_name}_s{seed}: target {meta['target']}, ACC {meta['clean_acc']:.4f}, "
                f"ASR {meta['asr']:.4f}, train {meta['train_seconds']:.0f}s"
            )
    click.echo("\n".join(["== summary", *summary]))


if __name__ == "__main__":
    main()
