"""Run ANP's mask optimisation on an example folder and measure ACC/ASR after pruning the k smallest masks.

The numbers in docs/METHOD.md come from this script, e.g.::

    .venv/bin/python tools/anp_sweep.py examples/badnets_resnet_bn --iterations 400 --eps 0.1 --counts 4,8,15,30,60

Poisoned data only measures here: nothing in the run chooses from it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anp_onnx.bridge.importer import import_model  # noqa: E402
from anp_onnx.data import load_samples  # noqa: E402
from anp_onnx.methods import anp  # noqa: E402
from anp_onnx.methods.anp import AnpSettings  # noqa: E402
from anp_onnx.methods.perturbation import calibrate, tensors  # noqa: E402
from anp_onnx.onnx.model import input_shape  # noqa: E402
from anp_onnx.onnx.neurons import build_neuron_map  # noqa: E402
from anp_onnx.onnx.rewrite import apply_plan  # noqa: E402
from anp_onnx.prune import by_count  # noqa: E402


def predictions(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 1000]})[0] for i in range(0, len(x), 1000)]).argmax(1)


@click.command()
@click.argument("example", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--iterations", default=400, show_default=True)
@click.option("--eps", default=0.4, show_default=True)
@click.option("--alpha", default=0.2, show_default=True)
@click.option("--mask-lr", default=0.2, show_default=True)
@click.option("--neuron-mode", type=click.Choice(["batchnorm", "bias"]), default="batchnorm", show_default=True)
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--counts", default="4,8,15,30,60", show_default=True, help="Numbers of neurons to prune.")
def main(
    example: Path,
    iterations: int,
    eps: float,
    alpha: float,
    mask_lr: float,
    neuron_mode: str,
    augment: bool,
    seed: int,
    counts: str,
) -> None:
    settings = AnpSettings(
        iterations=iterations,
        eps=eps,
        alpha=alpha,
        mask_lr=mask_lr,
        neuron_mode=neuron_mode,
        augment=augment,
        seed=seed,
    )
    model = onnx.load(str(example / "model.onnx"))
    neuron_map = build_neuron_map(model)
    shape = input_shape(model)
    clean, test, poison = (load_samples(example / f"{name}.npz", shape) for name in ("clean", "test", "poison"))
    classifier = import_model(model, neuron_map, renormalise=True)
    x, y = tensors(clean.x, clean.y, torch.device("cpu"))
    torch.manual_seed(seed)
    calibrate(classifier, x, neuron_mode=settings.neuron_mode)
    start = time.perf_counter()
    values = anp.optimise_masks(classifier, x, y, settings)
    elapsed = time.perf_counter() - start
    masks = np.sort(np.concatenate(list(values.masks.values())))
    click.echo(f"{example.name} {settings}")
    click.echo(f"optimised in {elapsed:.0f} s; {int((masks < 0.2).sum())} of {len(masks)} masks below 0.2")
    before_acc = np.mean(predictions(model, test.x) == test.y)
    before_asr = np.mean(predictions(model, poison.x) == poison.y)
    click.echo(f"  k=  0 ACC={before_acc:.4f} ASR={before_asr:.4f}")
    for count in (int(part) for part in counts.split(",")):
        pruned = apply_plan(model, neuron_map, by_count(values, count))
        acc = np.mean(predictions(pruned, test.x) == test.y)
        asr = np.mean(predictions(pruned, poison.x) == poison.y)
        click.echo(f"  k={count:3d} ACC={acc:.4f} ASR={asr:.4f}")


if __name__ == "__main__":
    main()
