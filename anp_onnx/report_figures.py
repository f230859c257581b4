"""A model's figures for `--report-dir`: the mask histogram and the threshold sweep, drawn from a
purify result and re-measured on the model's test (else clean) and poison data."""

from __future__ import annotations

from anp_onnx import prune
from anp_onnx.data import load_samples
from anp_onnx.manifest import BatchJob
from anp_onnx.model import input_shape, load_model
from anp_onnx.plots import plot_mask_distribution, plot_threshold_sweep
from anp_onnx.prune import PruningPlan
from anp_onnx.purify import PurifyResult
from anp_onnx.sweep import threshold_sweep


def make_figures(job: BatchJob, result: PurifyResult) -> dict[str, object]:
    """Write the job's PNGs; returns the report entries that describe them (`sweep`, `plots`)."""
    options = job.options
    model = load_model(job.model)
    shape = input_shape(model)
    if options.test_data is not None:
        clean, acc_label = load_samples(options.test_data, shape, "--test-data"), "ACC (test data)"
    else:
        clean, acc_label = load_samples(options.data, shape, "--data"), "ACC (clean --data, no test data)"
    poison = load_samples(options.poison_data, shape, "--poison-data") if options.poison_data else None
    points = threshold_sweep(
        model, result.neuron_map, result.masks, clean, poison, device=job.device, class_output=options.class_output
    )
    cut = pruning_cut(result.plan, result.masks)
    paths = job.plot_paths
    plot_mask_distribution(
        result.masks, cut, paths["masks"], title=f"{job.name}: mask values ({result.plan.criterion})"
    )
    chosen = cut if result.plan.criterion.startswith("threshold") else None
    plot_threshold_sweep(points, paths["sweep"], chosen, title=f"{job.name}: pruning by threshold", acc_label=acc_label)
    return {
        "sweep": [point.as_dict() for point in points],
        "plots": {kind: path.name for kind, path in paths.items()},
    }


def pruning_cut(plan: PruningPlan, masks: prune.MaskValues) -> float | None:
    """The mask value that separates pruned from kept neurons: the threshold itself for a threshold
    plan, else halfway between the largest pruned and the smallest kept mask."""
    if plan.criterion.startswith("threshold<"):
        return float(plan.criterion.removeprefix("threshold<"))
    if not plan.neurons:
        return None
    ranked = masks.ranked()
    largest_pruned = ranked[len(plan.neurons) - 1].mask
    smallest_kept = ranked[len(plan.neurons)].mask if len(plan.neurons) < len(ranked) else largest_pruned
    return (largest_pruned + smallest_kept) / 2
