"""Untrained models of a chosen size, for measuring what the defence costs against labels and input size (issue 23).

Training a ResNet-18 with 1000 labels on 224x224 images is out of reach on a CPU, and the cost of a purify
or scan run depends on the network's shape, not on what it learnt. So this makes, per architecture, label
count and input side, a randomly initialised network that is numerically sane and labels its own inputs:

* Images: Fashion-MNIST test images, resized to ``size x size`` (bilinear) and stored as uint8; three
  identical channels (N, S, S, 3) for the torchvision networks, one channel (N, S, S) for ``small_resnet``,
  as the repo's other Fashion-MNIST models take. The model's input is float32 NCHW in [0, 1]
  (tools/train_backdoor.py ``to_input``).
* Weights: seeded random initialisation, then BatchNorm running statistics set to the cumulative average
  over the clean images (one train-mode pass without gradients), so the eval-mode network neither explodes
  nor vanishes.
* Labels: the ONNX model's own argmax, so clean accuracy is 100 % and the defence's accuracy checks mean
  something. A random network tends to send every image to one or a few labels; when its predictions on
  the clean images cover fewer than half of the labels they could, or one label takes more than twice its
  share (``--head auto``), the last Linear layer is fitted for ``HEAD_STEPS`` steps to labels spread evenly
  over every label and scaled to logits of at most ``LOGIT_SCALE``, and the labels are the fitted
  network's predictions. meta.json records which was needed and how many distinct labels appear.

Writes ``model.onnx``, ``clean.npz``, ``test.npz`` and ``meta.json`` (tools/example_files.py); there is no
backdoor, so no ``poison.npz``. Example::

    .venv/bin/python tools/scale_models.py --arch resnet18 --labels 1000 --size 224 \\
        --out-dir cache/scale/resnet18_l1000_s224
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from tools.architectures import build  # noqa: E402
from tools.datasets import load_fashion_mnist  # noqa: E402
from tools.example_files import write_example  # noqa: E402
from tools.train_backdoor import check_parity, export_onnx, onnx_logits, sample, to_input  # noqa: E402

ARCHES = ("resnet18", "mobilenet_v2", "small_resnet")
HEAD_CHOICES = ("auto", "raw", "fit")
HEAD_STEPS = 100
HEAD_LR = 0.05
LOGIT_SCALE = 10.0  # largest |logit| on the clean images once the head is fitted: a trained network's size
BATCH = 32  # images per forward pass: bounds memory at 224x224
PARITY_IMAGES = 8


def build_network(arch: str, labels: int, size: int) -> tuple[nn.Module, int]:
    """The untrained network and the number of input channels it takes."""
    if arch == "resnet18":
        return torchvision.models.resnet18(num_classes=labels, weights=None), 3
    if arch == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(num_classes=labels, weights=None), 3
    if arch == "small_resnet":
        return build("small_resnet", num_classes=labels, in_channels=1, image_size=size), 1
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHES}")


def resize_images(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (N, H, W) -> uint8 (N, size, size), or (N, size, size, 3) with the grey value repeated."""
    out = np.empty((len(images), size, size), np.uint8)
    for start in range(0, len(images), BATCH):
        chunk = torch.from_numpy(images[start : start + BATCH]).float()[:, None]
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False)
        out[start : start + len(chunk)] = resized[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return np.repeat(out[..., None], 3, axis=3) if channels == 3 else out


def batches(x: np.ndarray) -> Iterator[torch.Tensor]:
    """The model's float32 NCHW input for uint8 images, ``BATCH`` at a time."""
    for start in range(0, len(x), BATCH):
        yield torch.from_numpy(to_input(x[start : start + BATCH]))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: np.ndarray) -> None:
    """Running mean and variance of every BatchNorm layer := their average over ``x`` (momentum None is a
    cumulative average); one pass suffices, since in train mode each layer normalises by its batch's own
    statistics whatever the running ones are."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for xb in batches(x):
        model(xb)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def final_linear(model: nn.Module) -> nn.Linear:
    """The classification head: the network's last Linear layer."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@contextmanager
def captured_inputs(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect what ``module`` is called with while the block runs."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def head_features(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    """The eval-mode input of the final Linear layer for every image of ``x``."""
    model.eval()
    with captured_inputs(final_linear(model)) as seen:
        for xb in batches(x):
            model(xb)
    return torch.cat(seen)


def spread_labels(count: int, labels: int, seed: int) -> np.ndarray:
    """``count`` labels in random order, each of the ``labels`` used as evenly as ``count`` allows."""
    rng = np.random.default_rng([seed, 3])
    return rng.permutation(np.resize(rng.permutation(labels), count)).astype(np.int64)


def fit_head(head: nn.Linear, features: torch.Tensor, targets: np.ndarray, seed: int) -> float:
    """Fit ``head`` to ``targets`` by full-batch Adam on standardised features, fold the standardisation into
    its weights (the network's other layers stay as they are) and scale it so that no logit on ``features``
    exceeds ``LOGIT_SCALE`` in size; returns the last step's cross-entropy.

    The images are few and separable, so the fit drives the logits to hundreds; an absolute parity check
    (1e-3) then fails on float rounding alone, and no trained network answers that confidently. Scaling
    weight and bias by one positive factor changes no prediction."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z, y = (features - mean) / std, torch.from_numpy(targets)
    torch.manual_seed(seed)
    fitted = nn.Linear(z.shape[1], head.out_features)
    opt = torch.optim.Adam(fitted.parameters(), lr=HEAD_LR)
    for _ in range(HEAD_STEPS):
        loss = F.cross_entropy(fitted(z), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        weight = fitted.weight / std
        head.weight.copy_(weight)
        head.bias.copy_(fitted.bias - weight @ mean)
        scale = LOGIT_SCALE / head(features).abs().max()
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return float(loss.detach())


def needs_fitted_head(predictions: np.ndarray, labels: int) -> bool:
    """Predictions collapsed: of the ``k = min(labels, images)`` labels the images could hold, fewer than half
    appear, or one label takes more than twice its fair share (``images / k``). A random ResNet-18 with 10
    labels shows five of them but sends 457 of 500 images to one, which a constant network nearly matches."""
    counts = np.bincount(predictions, minlength=labels)
    k = min(labels, len(predictions))
    return np.count_nonzero(counts) < -(-k // 2) or counts.max() > 2 * len(predictions) / k


def shape_head(model: nn.Module, x: np.ndarray, labels: int, head: str, seed: int) -> dict[str, object]:
    """Keep the random head (``raw``), fit it (``fit``), or fit it only if predictions collapsed (``auto``)."""
    features = head_features(model, x)
    with torch.no_grad():
        raw = final_linear(model)(features).argmax(1).numpy()
    fit = head == "fit" or (head == "auto" and needs_fitted_head(raw, labels))
    info: dict[str, object] = {"head": "fitted" if fit else "raw", "distinct_labels_raw": len(np.unique(raw))}
    if fit:
        info["head_fit_loss"] = round(
            fit_head(final_linear(model), features, spread_labels(len(x), labels, seed), seed), 4
        )
        info["head_fit_steps"] = HEAD_STEPS
    return info


def logit_margin(logits: np.ndarray) -> float:
    """Median gap between the top two logits: how far an image is from changing label."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    return float(np.median(top2[:, 1] - top2[:, 0]))


class Laps:
    """Seconds spent in each named step, for meta.json: which step dominates at which size."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self.started - sum(self.seconds.values()), 1)

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def pick_images(seed: int, n_images: int, n_test: int, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random sets of Fashion-MNIST test images for clean.npz and test.npz, resized."""
    x_all, _ = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    picked = rng.permutation(sample(rng, np.arange(len(x_all)), n_images + n_test))
    return resize_images(x_all[picked[:n_images]], size, channels), resize_images(
        x_all[picked[n_images:]], size, channels
    )


def make_scale_example(
    arch: str,
    labels: int,
    size: int,
    out_dir: Path,
    n_images: int = 500,
    n_test: int = 200,
    seed: int = 0,
    head: str = "auto",
    export: str = "bn",
) -> dict[str, object]:
    """Build, label and export one untrained model and write its folder; returns its meta.json."""
    laps = Laps()
    torch.manual_seed(seed)
    model, channels = build_network(arch, labels, size)
    x_clean, x_test = pick_images(seed, n_images, n_test, size, channels)
    laps.lap("data")
    calibrate_batchnorm(model, x_clean)
    laps.lap("batchnorm")
    head_info = shape_head(model, x_clean, labels, head, seed)
    laps.lap("head")
    model_bytes = export_onnx(model, to_input(x_clean[:2]), export)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    parity = check_parity(model, session, x_clean[:PARITY_IMAGES])
    laps.lap("export")
    clean_logits, test_logits = onnx_logits(session, x_clean, BATCH), onnx_logits(session, x_test, BATCH)
    y_clean, y_test = clean_logits.argmax(1), test_logits.argmax(1)
    laps.lap("labels")
    write_example(out_dir, model_bytes, (x_clean, y_clean), (x_test, y_test))
    laps.lap("write")
    meta: dict[str, object] = {
        "arch": arch,
        "labels": labels,
        "size": size,
        "in_channels": channels,
        "seed": seed,
        "dataset": f"fashion-mnist test images, bilinear-resized to {size}x{size}",
        "label_rule": "the model's own argmax (onnxruntime); no backdoor, no poison.npz",
        "n_clean": n_images,
        "n_test": n_test,
        "parameters": sum(p.numel() for p in model.parameters()),
        **head_info,
        "distinct_labels_clean": len(np.unique(y_clean)),
        "distinct_labels_test": len(np.unique(y_test)),
        "median_logit_margin_clean": round(logit_margin(clean_logits), 4),
        "export": export,
        "onnx_parity_max_abs_diff": parity,
        **onnx_facts(model_bytes),
        "make_seconds": laps.total(),
        "seconds": laps.seconds,
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "onnx": onnx.__version__,
            "python": platform.python_version(),
        },
        "command": "tools/scale_models.py " + " ".join(sys.argv[1:]),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def onnx_facts(model_bytes: bytes) -> dict[str, object]:
    """File size, BatchNormalization node count and SHA-256 of the exported model."""
    ops = [node.op_type for node in onnx.load_from_string(model_bytes).graph.node]
    return {
        "onnx_bytes": len(model_bytes),
        "batchnorm_nodes": ops.count("BatchNormalization"),
        "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
    }


@click.command()
@click.option("--arch", type=click.Choice(ARCHES), required=True)
@click.option("--labels", type=click.IntRange(min=2), required=True, help="Output labels, e.g. 10, 43, 100, 1000.")
@click.option("--size", type=click.IntRange(min=8), required=True, help="Side of the square input, e.g. 28, 64, 224.")
@click.option("--images", "n_images", type=click.IntRange(min=2), default=500, show_default=True, help="clean.npz.")
@click.option("--test-images", "n_test", type=click.IntRange(min=1), default=200, show_default=True, help="test.npz.")
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--head", type=click.Choice(HEAD_CHOICES), default="auto", show_default=True, help="Fit the last layer?")
@click.option("--export", type=click.Choice(["bn", "folded"]), default="bn", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads for torch.")
def main(
    arch: str,
    labels: int,
    size: int,
    n_images: int,
    n_test: int,
    out_dir: Path,
    seed: int,
    head: str,
    export: str,
    threads: int,
) -> None:
    """Write an untrained ARCH model with LABELS outputs on SIZE x SIZE inputs, and its data, into OUT_DIR."""
    torch.set_num_threads(threads)
    meta = make_scale_example(arch, labels, size, out_dir, n_images, n_test, seed, head, export)
    click.echo(
        f"{arch} {labels} labels {size}x{size}: {meta['parameters']:,} parameters, {meta['onnx_bytes'] / 1e6:.1f} MB "
        f"ONNX, head {meta['head']} ({meta['distinct_labels_raw']} distinct raw), {meta['distinct_labels_clean']} "
        f"distinct clean labels, {meta['make_seconds']}s -> {out_dir}"
    )


if __name__ == "__main__":
    main()
