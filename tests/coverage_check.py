"""The acceptance check of issue 4 for one model file: import, optimise a few iterations on random data,
rewrite, and compare (a) the rewrite of an empty plan with the input, (b) a real rewrite with the torch
model under the same hard masks. Shared by the import-coverage and torchvision tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from anp_onnx.bridge.importer import GatedClassifier, check_equivalence, hard_masks, import_model, is_float16
from anp_onnx.bridge.normalise import normalised_for_torch
from anp_onnx.methods import anp
from anp_onnx.methods.anp import AnpSettings
from anp_onnx.onnx.model import check_supported, class_output_index, load_model
from anp_onnx.onnx.neurons import NeuronMap, build_neuron_map
from anp_onnx.onnx.rewrite import apply_plan
from anp_onnx.prune import MaskValues, PruningPlan

REWRITE_TOLERANCE = 1e-4  # of the largest output (at least 1), as importer.check_equivalence measures
FLOAT16_TOLERANCE = 1e-2  # onnxruntime runs a float16 model in float16, torch in float32


@dataclass
class RoundTrip:
    model: onnx.ModelProto
    neuron_map: NeuronMap
    classifier: GatedClassifier
    masks: MaskValues
    plan: PruningPlan
    rewritten: onnx.ModelProto


def ort_outputs(model: onnx.ModelProto | Path, x: np.ndarray, output: str | None = None) -> np.ndarray:
    """One output of `model` on `x` with onnxruntime: fed in the model's input type, in batches of its
    batch size when that is fixed."""
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    x = x.astype(np.float16) if feed.type == "tensor(float16)" else x
    batch = feed.shape[0] if isinstance(feed.shape[0], int) else len(x)
    names = [output] if output else [session.get_outputs()[0].name]
    return np.concatenate([session.run(names, {feed.name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def torch_outputs(classifier: GatedClassifier, x: np.ndarray) -> np.ndarray:
    classifier.eval()
    with torch.no_grad():
        return classifier.class_output(torch.from_numpy(x)).numpy()  # head included, as onnxruntime


def every_third_channel(masks: MaskValues) -> PruningPlan:
    """Channels 0, 3, 6, ... of every layer, with the pruned values the optimisation left."""
    return PruningPlan("every third", tuple(neuron for neuron in masks.ranked() if neuron.channel % 3 == 0))


def round_trip(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    class_output: str | None = None,
    settings: AnpSettings | None = None,
) -> RoundTrip:
    """Run issue 4's acceptance check on the model at `path`; returns what it built for further asserts."""
    settings = settings or AnpSettings(iterations=2, batch_size=8)
    model = load_model(path)
    check_supported(model, path)
    output_index = class_output_index(model, class_output)
    output_name = model.graph.output[output_index].name
    neuron_map = build_neuron_map(model)
    assert neuron_map.layers, "something to prune"
    classifier = import_model(model, neuron_map, renormalise=True, output_index=output_index)
    reference = ort_outputs(model, x, output_name)
    check_equivalence(classifier, x, reference, str(path))

    torch.manual_seed(0)
    anp.calibrate(classifier, torch.from_numpy(x), neuron_mode=settings.neuron_mode)
    masks = anp.optimise_masks(classifier, torch.from_numpy(x), torch.from_numpy(y), settings)
    assert all(np.isfinite(values).all() for values in masks.masks.values())

    untouched = apply_plan(model, neuron_map, PruningPlan("none", ()))
    assert np.array_equal(ort_outputs(untouched, x, output_name), reference), "(a) pruning nothing changes nothing"

    plan = every_third_channel(masks)
    rewritten = apply_plan(model, neuron_map, plan)
    hard_masks(classifier, plan)
    expected = torch_outputs(classifier, x)
    scale = max(1.0, float(np.max(np.abs(expected))))
    if is_float16(model):
        as_float32 = ort_outputs(normalised_for_torch(rewritten), x, output_name)
        assert np.max(np.abs(as_float32 - expected)) <= REWRITE_TOLERANCE * scale, "(b) in float32"
        actual = ort_outputs(rewritten, x, output_name).astype(np.float32)
        assert np.max(np.abs(actual - expected)) <= FLOAT16_TOLERANCE * scale, "(b) in float16"
    else:
        actual = ort_outputs(rewritten, x, output_name)
        assert np.max(np.abs(actual - expected)) <= REWRITE_TOLERANCE * scale, (
            "(b) the rewrite computes what torch does"
        )
    assert not np.allclose(actual, reference, rtol=0, atol=1e-6), "pruning a third of the neurons changes the outputs"
    return RoundTrip(model, neuron_map, classifier, masks, plan, rewritten)
