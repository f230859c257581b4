"""Weights changed in torch are written back into the ONNX initializers: the same graph, only stored
values change, and onnxruntime computes what torch computes."""

import numpy as np
import onnx
import pytest
import torch

from anp_onnx.bridge.importer import check_equivalence, import_model
from anp_onnx.bridge.weights import trainable_parameters, weight_slots, weight_updates
from anp_onnx.onnx.model import load_model
from anp_onnx.onnx.neurons import build_neuron_map
from anp_onnx.onnx.rewrite import save_model
from anp_onnx.onnx.weights import apply_weights
from anp_onnx.validate.evaluate import Evaluator


def structure(model: onnx.ModelProto) -> tuple:
    graph = model.graph
    return (
        [(node.op_type, list(node.input), list(node.output)) for node in graph.node],
        [value.name for value in graph.input],
        [value.name for value in graph.output],
        sorted(tensor.name for tensor in graph.initializer),
        [(entry.domain, entry.version) for entry in model.opset_import],
    )


@pytest.mark.parametrize(("name", "width"), [("folded", 16), ("batchnorm", 16), ("matmul", 20)])
def test_changed_weights_are_written_into_the_same_graph(models, tmp_path, name, width):
    model = load_model(models[name])
    classifier = import_model(model, build_neuron_map(model), renormalise=True)
    slots = weight_slots(classifier, model)
    assert slots, "every net here has trainable weights"
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trainable_parameters(classifier, slots):
            parameter.mul_(1 + 0.1 * torch.randn_like(parameter))
    written, changes = apply_weights(model, weight_updates(classifier, slots))
    save_model(written, tmp_path / "changed.onnx")
    assert structure(written) == structure(model)
    assert {change.initializer for change in changes} == {slot.initializer for slot in slots}
    assert all(0 < change.relative_change < 0.5 for change in changes)
    shape = (1, 16, 16) if width == 16 else (20,)
    inputs = np.random.default_rng(1).random((12, *shape), dtype=np.float32)
    check_equivalence(classifier, inputs, Evaluator(tmp_path / "changed.onnx", "cpu").outputs(inputs), "changed")
    original = Evaluator(models[name], "cpu").outputs(inputs)
    assert np.max(np.abs(original - Evaluator(tmp_path / "changed.onnx", "cpu").outputs(inputs))) > 1e-3


def test_unchanged_weights_change_nothing(models):
    model = load_model(models["batchnorm"])
    classifier = import_model(model, build_neuron_map(model), renormalise=True)
    written, changes = apply_weights(model, weight_updates(classifier, weight_slots(classifier, model)))
    assert changes == []
    assert written.SerializeToString() == model.SerializeToString()


def test_constants_read_by_several_nodes_are_not_trained(models):
    """The exporter's deduplicated BatchNorm tensors (Identity nodes on one initializer) stay as they are."""
    model = load_model(models["batchnorm"])
    classifier = import_model(model, build_neuron_map(model), renormalise=True)
    slot_inputs = {(slot.node_index, slot.position) for slot in weight_slots(classifier, model)}
    identity_outputs = {node.output[0] for node in model.graph.node if node.op_type == "Identity"}
    for index, node in enumerate(model.graph.node):
        for position, name in enumerate(node.input):
            if name in identity_outputs:
                assert (index, position) not in slot_inputs
