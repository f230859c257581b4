"""The JSON report a pipeline reads, and the short before/after table a person reads."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from anp_onnx import __version__
from anp_onnx.onnx.rewrite import write_text_atomically
from anp_onnx.pipeline.purify import PurifyResult
from anp_onnx.validate.evaluate import Metrics


def metrics_dict(metrics: Metrics) -> dict[str, object]:
    return {
        "acc": metrics.acc,
        "asr": metrics.asr,
        "clean_samples": metrics.clean_samples,
        "poison_samples": metrics.poison_samples,
    }


def purify_report(result: PurifyResult) -> dict[str, object]:
    pruned_per_layer = {layer.name: 0 for layer in result.neuron_map.layers}
    for neuron in result.plan.neurons:
        pruned_per_layer[neuron.layer] += 1
    return {
        "tool": "anp-onnx",
        "version": __version__,
        "model": str(result.model),
        "output": str(result.output),
        "before": metrics_dict(result.before),
        "after": metrics_dict(result.after),
        "pruned_neurons": len(result.plan.neurons),
        "total_neurons": result.neuron_map.total_neurons,
        "criterion": result.plan.criterion,
        "pruned": [asdict(neuron) for neuron in result.plan.neurons],
        "layers": [
            {
                "name": layer.name,
                "op_type": layer.op_type,
                "channels": layer.channels,
                "pruned": pruned_per_layer[layer.name],
                "masks": [round(float(value), 6) for value in result.masks.masks[layer.name]],
                "pruned_values": [float(value) for value in result.masks.pruned_values[layer.name]],
            }
            for layer in result.neuron_map.layers
        ],
        "settings": {"method": result.method, **result.settings.report_entry()},
        "iterations_run": result.iterations_run,
        "guided": result.guided,
        "repair": result.repair.summary() if result.repair is not None else None,
        "verdict": result.verdict.as_dict() if result.verdict is not None else None,
        "device": result.device,
        "providers": result.providers,
        "timings_s": result.timings,
    }


def write_json(path: str | Path, report: dict[str, object]) -> None:
    write_text_atomically(path, json.dumps(report, indent=2) + "\n")


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def before_after_table(before: Metrics, after: Metrics) -> str:
    rows = [("", "before", "after"), ("ACC", percent(before.acc), percent(after.acc))]
    rows.append(("ASR", percent(before.asr), percent(after.asr)))
    return "\n".join(f"{name:<4} {left:>9} {right:>9}" for name, left, right in rows)
