"""Follow ANP's masks through a run: every `--every` iterations, prune by several rules from the last
iterate and from running means of the masks, and measure ACC/ASR of each choice.

The trace tables in docs/METHOD.md come from this script, e.g.::

    .venv/bin/python tools/anp_trace.py examples/badnets_resnet_bn --iterations 2000 --mask-lr 0.05

Poisoned data only measures here: the rules see nothing but masks (and held-out clean data).
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

from anp_onnx import prune  # noqa: E402
from anp_onnx.bridge.importer import import_model  # noqa: E402
from anp_onnx.data import Samples, load_samples  # noqa: E402
from anp_onnx.methods import anp  # noqa: E402
from anp_onnx.methods.anp import AnpSettings  # noqa: E402
from anp_onnx.methods.perturbation import calibrate, tensors  # noqa: E402
from anp_onnx.onnx.model import input_shape  # noqa: E402
from anp_onnx.onnx.neurons import build_neuron_map  # noqa: E402
from anp_onnx.onnx.rewrite import apply_plan  # noqa: E402
from anp_onnx.prune import MaskValues, PruningPlan  # noqa: E402
from tools.anp_sweep import predictions  # noqa: E402


class Snapshots:
    """Mask copies every `every` iterations: the last iterate, the mean since `mean_from`, and the
    mean over the last `window` iterations."""

    def __init__(self, classifier, every: int, mean_from: int, window: int) -> None:
        self.classifier, self.every, self.mean_from, self.window = classifier, every, mean_from, window
        self.sums = [torch.zeros_like(gate.mask, dtype=torch.float64) for gate in classifier.gates]
        self.count = 0
        self.recent: list[list[torch.Tensor]] = []
        self.taken: list[tuple[int, dict[str, list[np.ndarray]]]] = []

    def __call__(self, iteration: int) -> None:
        masks = [gate.mask.detach().double().clone() for gate in self.classifier.gates]
        self.recent = [*self.recent[-(self.window - 1) :], masks]
        if iteration >= self.mean_from:
            for total, mask in zip(self.sums, masks, strict=True):
                total.add_(mask)
            self.count += 1
        if (iteration + 1) % self.every:
            return
        kinds = {"last": masks}
        if self.count:
            kinds["mean"] = [total / self.count for total in self.sums]
        kinds[f"window{self.window}"] = [torch.stack(group).mean(0) for group in zip(*self.recent, strict=True)]
        self.taken.append((iteration + 1, {kind: [m.numpy() for m in ms] for kind, ms in kinds.items()}))


def mask_values(classifier, masks: list[np.ndarray]) -> MaskValues:
    pairs = zip(classifier.neuron_map.layers, classifier.gates, masks, strict=True)
    return MaskValues(
        masks={layer.name: mask.astype(np.float32) for layer, _, mask in pairs},
        pruned_values={
            layer.name: gate.pruned_value.detach().double().numpy().copy()
            for layer, gate in zip(classifier.neuron_map.layers, classifier.gates, strict=True)
        },
    )


def watched_ranks(values: MaskValues, watch: str) -> str:
    """Rank (0 = smallest mask) of each watched neuron."""
    ranked = [(neuron.layer, neuron.channel) for neuron in values.ranked()]
    ranks = []
    for item in watch.split(","):
        part, channel = item.rsplit(":", 1)
        ranks.append(next(i for i, (layer, c) in enumerate(ranked) if part in layer and c == int(channel)))
    return "ranks " + ",".join(str(rank) for rank in ranks)


@click.command()
@click.argument("example", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--iterations", default=2000, show_default=True)
@click.option("--eps", default=0.4, show_default=True)
@click.option("--alpha", default=0.2, show_default=True)
@click.option("--mask-lr", default=0.2, show_default=True)
@click.option("--momentum", default=0.9, show_default=True)
@click.option("--every", default=100, show_default=True)
@click.option("--mean-from", default=100, show_default=True)
@click.option("--window", default=200, show_default=True)
@click.option("--holdout", default=100, show_default=True, help="Clean images held out for the accuracy budget.")
@click.option("--budget", default=2.0, show_default=True, help="Held-out accuracy drop allowed, in points.")
@click.option("--seed", default=0, show_default=True)
@click.option("--rules", default="thr0.2,thr0.3,k40,k60,k80,budget", show_default=True)
@click.option("--watch", default="", help="Neurons whose mask rank to print, as layer-substring:channel,...")
def main(
    example: Path,
    iterations: int,
    eps: float,
    alpha: float,
    mask_lr: float,
    momentum: float,
    every: int,
    mean_from: int,
    window: int,
    holdout: int,
    budget: float,
    seed: int,
    rules: str,
    watch: str,
) -> None:
    settings = AnpSettings(iterations=iterations, eps=eps, alpha=alpha, mask_lr=mask_lr, momentum=momentum, seed=seed)
    model = onnx.load(str(example / "model.onnx"))
    neuron_map = build_neuron_map(model)
    shape = input_shape(model)
    clean, test, poison = (load_samples(example / f"{name}.npz", shape) for name in ("clean", "test", "poison"))
    order = np.random.default_rng(seed).permutation(len(clean))
    held = Samples(clean.x[order[:holdout]], clean.y[order[:holdout]])
    kept = Samples(clean.x[order[holdout:]], clean.y[order[holdout:]])
    classifier = import_model(model, neuron_map, renormalise=True)
    x, y = tensors(kept.x, kept.y, torch.device("cpu"))
    torch.manual_seed(seed)
    calibrate(classifier, x, neuron_mode=settings.neuron_mode)
    snapshots = Snapshots(classifier, every, mean_from, window)
    start = time.perf_counter()
    anp.optimise_masks(classifier, x, y, settings, snapshots)
    click.echo(f"{example.name} {settings} holdout={holdout} budget={budget}")
    click.echo(f"optimised in {time.perf_counter() - start:.0f} s")

    def measure(plan: PruningPlan) -> tuple[float, float]:
        pruned = apply_plan(model, neuron_map, plan)
        return (
            100 * float(np.mean(predictions(pruned, test.x) == test.y)),
            100 * float(np.mean(predictions(pruned, poison.x) == poison.y)),
        )

    def held_accuracy(plan: PruningPlan) -> float:
        return 100 * float(np.mean(predictions(apply_plan(model, neuron_map, plan), held.x) == held.y))

    def plan_for(rule: str, values: MaskValues) -> PruningPlan:
        if rule.startswith("thr"):
            return prune.by_threshold(values, float(rule[3:]))
        if rule.startswith("k"):
            return prune.by_count(values, int(rule[1:]))
        return prune.by_accuracy_budget(values, budget, held_accuracy)

    click.echo(f"before: ACC/ASR {measure(PruningPlan('none', ()))}")
    for iteration, kinds in snapshots.taken:
        for kind, masks in kinds.items():
            values = mask_values(classifier, masks)
            cells = [watched_ranks(values, watch)] if watch else []
            for rule in rules.split(","):
                plan = plan_for(rule, values)
                acc, asr = measure(plan)
                cells.append(f"{rule}[{len(plan.neurons)}] {acc:.1f}/{asr:.1f}")
            click.echo(f"it{iteration:5d} {kind:9s} " + "  ".join(cells), nl=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
