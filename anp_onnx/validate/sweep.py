"""ACC and ASR against the pruning threshold (the paper's figure): each pruned variant is written with
the rewriter and measured with onnxruntime, so every point is what that file would really do."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from anp_onnx import prune
from anp_onnx.data import Samples
from anp_onnx.onnx.neurons import NeuronMap
from anp_onnx.onnx.rewrite import apply_plan, save_model
from anp_onnx.prune import MaskValues, PruningPlan
from anp_onnx.validate.evaluate import Evaluator

DEFAULT_THRESHOLDS = tuple(round(0.1 * step, 1) for step in range(10))  # 0.0 .. 0.9


@dataclass(frozen=True)
class SweepPoint:
    """The model pruned at `threshold` (None: the first `pruned` neurons of a plan, in its order): how
    many neurons that prunes, and its ACC / ASR (None: no data)."""

    threshold: float | None
    pruned: int
    acc: float | None
    asr: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def threshold_sweep(
    model: onnx.ModelProto,
    neuron_map: NeuronMap,
    masks: MaskValues,
    clean: Samples | None,
    poison: Samples | None,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    device: str = "auto",
    class_output: str | None = None,
) -> list[SweepPoint]:
    """One point per threshold; thresholds that prune the same neurons are measured once."""
    plans = [(float(threshold), prune.by_threshold(masks, threshold)) for threshold in thresholds]
    return _measure_plans(model, neuron_map, plans, clean, poison, device, class_output)


def prefix_sweep(
    model: onnx.ModelProto,
    neuron_map: NeuronMap,
    plan: PruningPlan,
    clean: Samples | None,
    poison: Samples | None,
    device: str = "auto",
    class_output: str | None = None,
) -> list[SweepPoint]:
    """One point per prefix of `plan` (0, 1, ... all of its neurons, in the order it pruned them)."""
    prefixes = [(None, PruningPlan(f"first {count}", plan.neurons[:count])) for count in range(len(plan.neurons) + 1)]
    return _measure_plans(model, neuron_map, prefixes, clean, poison, device, class_output)


def _measure_plans(
    model: onnx.ModelProto,
    neuron_map: NeuronMap,
    plans: list[tuple[float | None, PruningPlan]],
    clean: Samples | None,
    poison: Samples | None,
    device: str,
    class_output: str | None,
) -> list[SweepPoint]:
    """Each plan written by the rewriter and measured with onnxruntime; plans pruning the same neurons once."""
    points: list[SweepPoint] = []
    measured: dict[frozenset[tuple[str, int]], tuple[float | None, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="anp-sweep-") as folder:
        for threshold, plan in plans:
            key = frozenset((neuron.layer, neuron.channel) for neuron in plan.neurons)
            if key not in measured:
                variant = Path(folder) / "variant.onnx"
                save_model(apply_plan(model, neuron_map, plan), variant)
                metrics = Evaluator(variant, device, class_output).measure(clean, poison)
                measured[key] = (metrics.acc, metrics.asr)
            acc, asr = measured[key]
            points.append(SweepPoint(threshold, len(plan.neurons), acc, asr))
    return points
