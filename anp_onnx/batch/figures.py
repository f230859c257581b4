"""A model's figures for `--report-dir`, drawn from a purify result and re-measured on the model's test
(else clean) and poison data: for `--method trigger` the synthetic trigger and ACC / ASR round by
round (the method's pruning, before any repair) and the repair stage step by step; for `--method anp`
the mask histogram and the threshold sweep."""

from __future__ import annotations

from anp_onnx import prune
from anp_onnx.batch.manifest import BatchJob
from anp_onnx.data import load_samples
from anp_onnx.onnx.model import input_shape, load_model
from anp_onnx.pipeline.purify import PurifyResult
from anp_onnx.prune import PruningPlan
from anp_onnx.report.plots import (
    plot_mask_distribution,
    plot_pruning_rounds,
    plot_repair,
    plot_threshold_sweep,
    plot_trigger,
)
from anp_onnx.validate.sweep import prefix_sweep, threshold_sweep


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
    if result.guided is not None:
        return _trigger_figures(job, result, model, clean, poison, acc_label)
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


def _trigger_figures(job: BatchJob, result: PurifyResult, model, clean, poison, acc_label: str) -> dict[str, object]:
    options, paths = job.options, job.plot_paths
    example = load_samples(options.data, input_shape(model), "--data").x[0]
    trigger = result.triggers[0]
    summary = result.guided["triggers"][0]
    title = f"{job.name}: synthetic trigger for label {summary['target']} (success {100 * summary['success']:.0f}%)"
    plot_trigger(trigger["mask"], trigger["pattern"], example, paths["trigger"], title=title)
    pruning = result.method_plan or result.plan  # the method's rounds, also when repair replaced them
    points = prefix_sweep(
        model, result.neuron_map, pruning, clean, poison, device=job.device, class_output=options.class_output
    )
    guided = result.guided
    decided = [(guided["clean_accuracy_before"], guided["synthetic_asr_before"])]
    decided += [(step["clean_accuracy"], step["synthetic_asr"]) for step in guided["rounds"]]
    plot_pruning_rounds(points, decided, paths["rounds"], title=f"{job.name}: {pruning.criterion}", acc_label=acc_label)
    repair = result.repair.summary() if result.repair is not None else {}
    written = (result.after.acc, result.after.asr) if options.test_data is not None else (None, result.after.asr)
    plot_repair(
        repair.get("checks", []),
        written,
        paths["repair"],
        title=f"{job.name}: repair ({result.verdict.name if result.verdict else 'not checked'})",
        acc_label=acc_label,
        note="" if repair.get("ran") else f"repair did not run: {repair.get('why', 'no triggers')}",
    )
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
