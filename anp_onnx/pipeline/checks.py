"""The pipeline's checks of what it is given and of what it wrote: the output path, the labels against
the model's classes, and the rewritten file against the torch model with the same hard masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from anp_onnx.bridge.importer import GatedClassifier, check_equivalence, hard_masks
from anp_onnx.data import SampleFile, Samples
from anp_onnx.errors import AnpError
from anp_onnx.prune import PruningPlan


def check_output(model_path: Path, output: Path, force: bool) -> None:
    """The output must be a new file (or `force`) in an existing folder, and not the input."""
    if output.resolve() == model_path.resolve():
        raise AnpError(f"output {output} is the input model: choose another path with -o")
    if output.is_dir():
        raise AnpError(f"output {output} is a folder: give a file path with -o")
    if not output.parent.is_dir():
        raise AnpError(f"{output.parent}: output folder does not exist")
    if output.exists() and not force:
        raise AnpError(f"output {output} exists: pass --force to replace it, or choose another path with -o")


def check_labels(samples: Samples | SampleFile, classes: int, what: str) -> None:
    if samples.y.min() < 0 or samples.y.max() >= classes:
        raise AnpError(f"{what}: labels must lie in 0..{classes - 1} (the model has {classes} classes)")


def check_rewrite(
    classifier: GatedClassifier, plan: PruningPlan, inputs: np.ndarray, rewritten_outputs: np.ndarray
) -> None:
    """The rewritten file must compute what the torch model computes with the same hard masks, each
    pruned neuron outputting the constant the plan wrote for it."""
    with torch.no_grad():
        for layer, gate in zip(classifier.neuron_map.layers, classifier.gates, strict=True):
            for neuron in plan.neurons:
                if neuron.layer == layer.name:
                    gate.pruned_value[neuron.channel] = neuron.value
    hard_masks(classifier, plan)
    try:
        check_equivalence(classifier, inputs, rewritten_outputs, "rewritten model")
    except AnpError as error:
        raise RuntimeError(f"internal check failed: {error}") from None
