import onnx
import pytest

from anp_onnx.onnx.graph import Graph
from anp_onnx.onnx.neurons import build_neuron_map, current_bias


def layers_of(path):
    neuron_map = build_neuron_map(onnx.load(str(path)))
    return neuron_map, [(layer.op_type, layer.channels) for layer in neuron_map.layers]


def test_folded_batch_norm_export_makes_conv_channels_the_neurons(models):
    neuron_map, layers = layers_of(models["folded"])
    assert layers == [("Conv", 6), ("Conv", 8), ("Gemm", 12)]
    conv = neuron_map.layers[1]
    assert conv.weight_axis == 0 and conv.channel_axis == 1
    assert conv.bias is not None and conv.bias_per_channel, "folding BatchNorm gives the bias-free conv a bias"
    assert not conv.batch_normalised


def test_kept_batch_norm_makes_batch_norm_channels_the_neurons_through_identity(models):
    neuron_map, layers = layers_of(models["batchnorm"])
    assert layers == [("BatchNormalization", 6), ("BatchNormalization", 8), ("Gemm", 12)]
    model = onnx.load(str(models["batchnorm"]))
    graph = Graph(model)
    batch_norm = neuron_map.layers[0]
    node = model.graph.node[batch_norm.node_index]
    assert batch_norm.batch_normalised
    assert {graph.resolve_initializer(name) for name in node.input[1:3]} == {batch_norm.weight, batch_norm.bias}
    assert any(name not in graph.initializers for name in node.input[1:5]), "one parameter sits behind Identity"


def test_gemm_neurons_index_the_weight_by_transb(models):
    neuron_map, _ = layers_of(models["folded"])
    gemm = neuron_map.layers[2]
    graph = Graph(onnx.load(str(models["folded"])))
    assert list(graph.initializers[gemm.weight].dims) == [12, 32]
    assert gemm.weight_axis == 0 and gemm.channel_axis == -1


def test_matmul_neurons_take_the_following_add_as_bias(models):
    model = onnx.load(str(models["matmul"]))
    neuron_map = build_neuron_map(model)
    dense1, dense2 = neuron_map.layers
    assert (dense1.op_type, dense1.channels, dense1.weight_axis, dense1.bias) == ("MatMul", 16, 1, "b1")
    assert model.graph.node[dense1.output_node_index].name == "dense1/Add"
    assert (dense2.channels, dense2.bias) == (12, None)
    assert current_bias(Graph(model), dense2).tolist() == [0.0] * 12


@pytest.mark.parametrize("kind", ["folded", "batchnorm", "matmul"])
def test_the_classifier_head_is_never_a_neuron(models, kind):
    neuron_map, _ = layers_of(models[kind])
    assert len(neuron_map.skipped) == 1
    assert "classifier head" in neuron_map.skipped[0][1]
