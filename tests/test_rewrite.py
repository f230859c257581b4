import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from anp_onnx.bridge.importer import hard_masks, import_model
from anp_onnx.methods import anp
from anp_onnx.onnx.neurons import build_neuron_map
from anp_onnx.onnx.rewrite import apply_plan, save_model
from anp_onnx.prune import PruningPlan


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def calibrated(model: onnx.ModelProto, x: np.ndarray, neuron_mode: str):
    """Converted model with gates whose pruned values are set as purify sets them."""
    neuron_map = build_neuron_map(model)
    classifier = import_model(model, neuron_map, renormalise=True)
    anp.calibrate(classifier, torch.from_numpy(x), neuron_mode=neuron_mode)
    return neuron_map, classifier


def every_other_channel(neuron_map, classifier) -> PruningPlan:
    values = anp.mask_values(classifier)
    chosen = [neuron for neuron in values.ranked() if neuron.channel % 2 == 0]
    return PruningPlan("test", tuple(chosen))


@pytest.mark.parametrize("kind", ["folded", "batchnorm", "matmul"])
def test_pruning_nothing_reproduces_the_input_exactly(models, image_samples, vector_samples, kind):
    model = onnx.load(str(models[kind]))
    x = np.load(vector_samples if kind == "matmul" else image_samples)["x"]
    rewritten = apply_plan(model, build_neuron_map(model), PruningPlan("none", ()))
    assert rewritten.SerializeToString() == model.SerializeToString()
    assert np.array_equal(run(rewritten, x), run(model, x))


@pytest.mark.parametrize("neuron_mode", ["batchnorm", "bias"])
@pytest.mark.parametrize("kind", ["folded", "batchnorm", "matmul"])
def test_rewritten_model_computes_what_torch_computes_with_the_same_hard_masks(
    models, image_samples, vector_samples, kind, neuron_mode
):
    model = onnx.load(str(models[kind]))
    x = np.load(vector_samples if kind == "matmul" else image_samples)["x"]
    neuron_map, classifier = calibrated(model, x, neuron_mode)
    plan = every_other_channel(neuron_map, classifier)
    rewritten = apply_plan(model, neuron_map, plan)
    hard_masks(classifier, plan)
    classifier.eval()
    with torch.no_grad():
        expected = classifier(torch.from_numpy(x)).numpy()
    actual = run(rewritten, x)
    assert np.max(np.abs(actual - expected)) <= 1e-4
    assert not np.allclose(actual, run(model, x), atol=1e-3), "pruning half the neurons must change the outputs"


def test_a_pruned_batch_norm_channel_outputs_its_beta(models, image_samples):
    model = onnx.load(str(models["batchnorm"]))
    x = np.load(image_samples)["x"]
    neuron_map, classifier = calibrated(model, x, "batchnorm")
    plan = every_other_channel(neuron_map, classifier)
    first = neuron_map.layers[0]
    rewritten = apply_plan(model, neuron_map, plan)
    scale_input = rewritten.graph.node[first.node_index].input[1]
    scale = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}[scale_input]
    bias_before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[first.bias]
    bias_after = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}[first.bias]
    assert scale[0::2].tolist() == [0.0] * 3 and (scale[1::2] != 0).all()
    assert np.array_equal(bias_before, bias_after), "the pruned channel keeps beta, its constant output"
    variance = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}[first.weight]
    assert (variance != 0).all(), "the exporter made scale and running_var one tensor: it is copied, not zeroed"


def test_a_pruned_folded_conv_channel_outputs_its_clean_mean(models, image_samples):
    model = onnx.load(str(models["folded"]))
    x = np.load(image_samples)["x"]
    neuron_map, classifier = calibrated(model, x, "batchnorm")
    conv = neuron_map.layers[0]
    plan = PruningPlan("one", tuple(n for n in anp.mask_values(classifier).ranked() if n.layer == conv.name)[:1])
    rewritten = apply_plan(model, neuron_map, plan)
    channel = plan.neurons[0].channel
    mean = classifier.gates[0].reference_mean[channel].item()
    bias = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}[conv.bias]
    assert bias[channel] == pytest.approx(mean, abs=1e-6)
    assert plan.neurons[0].value == pytest.approx(mean, abs=1e-6)


@pytest.mark.parametrize("kind", ["folded", "batchnorm", "matmul"])
def test_everything_but_the_pruned_channels_stays_byte_identical(models, image_samples, vector_samples, kind):
    model = onnx.load(str(models[kind]))
    x = np.load(vector_samples if kind == "matmul" else image_samples)["x"]
    neuron_map, classifier = calibrated(model, x, "batchnorm")
    plan = every_other_channel(neuron_map, classifier)
    rewritten = apply_plan(model, neuron_map, plan)

    def without_initializers(proto: onnx.ModelProto) -> bytes:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        del copy.graph.initializer[:]
        return copy.SerializeToString()

    before = {tensor.name: tensor for tensor in model.graph.initializer}
    after = {tensor.name: tensor for tensor in rewritten.graph.initializer}
    copies = [name for name in after if name not in before]
    assert list(after)[: len(before)] == list(before), "initializers keep their order; copies come last"
    pruned_weights = {layer.name: rewritten.graph.node[layer.node_index].input[1] for layer in neuron_map.layers}
    for old_node, new_node in zip(model.graph.node, rewritten.graph.node, strict=True):
        for position, (old_input, new_input) in enumerate(zip(old_node.input, new_node.input, strict=True)):
            if old_input != new_input:
                assert new_input in copies, "a node input changes only to point at a copy of a shared initializer"
                new_node.input[position] = old_input
    assert without_initializers(rewritten) == without_initializers(model)
    touched = {name for layer in neuron_map.layers for name in (layer.weight, layer.bias) if name}
    for name, tensor in before.items():
        if name not in touched:
            assert after[name].SerializeToString() == tensor.SerializeToString(), name
    for layer in neuron_map.layers:
        weight_name = pruned_weights[layer.name] if pruned_weights[layer.name] in copies else layer.weight
        old, new = numpy_helper.to_array(before[layer.weight]), numpy_helper.to_array(after[weight_name])
        pruned = plan.channels_of(layer.name)
        kept = [c for c in range(layer.channels) if c not in pruned]
        assert np.array_equal(np.take(old, kept, layer.weight_axis), np.take(new, kept, layer.weight_axis))
        assert not np.take(new, pruned, layer.weight_axis).any()


def shared_weight_model() -> onnx.ModelProto:
    """Two Conv branches reading one weight initializer, added, then a Conv head."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "shared_w")
    head = numpy_helper.from_array(rng.normal(size=(3, 4, 1, 1)).astype(np.float32), "head_w")
    nodes = [
        helper.make_node("Conv", ["input", "shared_w"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["input", "shared_w"], ["b"], name="conv_b", pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Add", ["a", "rb"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "head_w"], ["c"], name="head"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["logits"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 1, 6, 6])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 3])],
        [weight, head],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_shared_initializer_is_copied_before_one_of_its_readers_is_pruned():
    model = shared_weight_model()
    neuron_map = build_neuron_map(model)
    conv_a = neuron_map.layer("conv_a")
    from anp_onnx.prune import PrunedNeuron

    rewritten = apply_plan(model, neuron_map, PruningPlan("one", (PrunedNeuron(conv_a.name, 1, 0.0, 0.0),)))
    nodes = {node.name: node for node in rewritten.graph.node}
    assert nodes["conv_b"].input[1] == "shared_w"
    assert nodes["conv_a"].input[1] != "shared_w"
    tensors = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert not tensors[nodes["conv_a"].input[1]][1].any()
    assert np.array_equal(tensors["shared_w"], numpy_helper.to_array(model.graph.initializer[0]))


def test_save_model_leaves_no_temporary_files(tmp_path, models):
    model = onnx.load(str(models["folded"]))
    save_model(model, tmp_path / "out.onnx")
    assert [path.name for path in tmp_path.iterdir()] == ["out.onnx"]
    assert (tmp_path / "out.onnx").read_bytes() == model.SerializeToString()
