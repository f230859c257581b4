"""Graphs as converters write them, built with onnx.helper: weights behind Identity/Constant/Cast/Reshape/
Transpose, shared initializers, Conv with and without bias, grouped and depthwise Conv, ConvTranspose,
Gemm with transA/transB, MatMul + Add. Each passes issue 4's round trip (coverage_check.round_trip)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from coverage_check import round_trip
from onnx import TensorProto, helper, numpy_helper

from anp_onnx.onnx.graph import Graph
from anp_onnx.onnx.neurons import build_neuron_map, channel_entries
from anp_onnx.onnx.rewrite import apply_plan
from anp_onnx.prune import PrunedNeuron, PruningPlan

IMAGE = (3, 8, 8)
FEATURES = 12
CLASSES = 3
Built = tuple[list[onnx.NodeProto], list[onnx.TensorProto], int]  # nodes input -> "features", tensors, channels


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def tensor(name: str, *shape: int, dtype=np.float32, scale: float = 0.5) -> onnx.TensorProto:
    values = rng().normal(0, scale, shape) if shape else rng().normal(0, scale)
    return numpy_helper.from_array(np.asarray(values).astype(dtype), name)


def image_model(built: Built, name: str) -> onnx.ModelProto:
    """`built` turns `input` into `features`; then Relu, a 1x1 Conv head, global pooling and Flatten."""
    nodes, tensors, channels = built
    graph = helper.make_graph(
        [
            *nodes,
            helper.make_node("Relu", ["features"], ["relu"], name="relu"),
            helper.make_node("Conv", ["relu", "head_w"], ["head"], name="head"),
            helper.make_node("GlobalAveragePool", ["head"], ["pooled"], name="pool"),
            helper.make_node("Flatten", ["pooled"], ["logits"], name="flatten"),
        ],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [*tensors, tensor("head_w", CLASSES, channels, 1, 1)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def vector_model(built: Built, name: str) -> onnx.ModelProto:
    """`built` turns `input` [batch, 12] into `features`; then Relu and a Gemm head."""
    nodes, tensors, channels = built
    graph = helper.make_graph(
        [
            *nodes,
            helper.make_node("Relu", ["features"], ["relu"], name="relu"),
            helper.make_node("Gemm", ["relu", "head_w", "head_b"], ["logits"], name="head", transB=1),
        ],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [*tensors, tensor("head_w", CLASSES, channels), tensor("head_b", CLASSES)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def conv(inputs: list[str], output: str, name: str, **attributes) -> onnx.NodeProto:
    return helper.make_node("Conv", inputs, [output], name=name, pads=[1, 1, 1, 1], **attributes)


def first_conv(channels: int = 4) -> Built:
    """A plain Conv 3 -> `channels` with Relu, so that every model has an ordinary layer too."""
    nodes = [conv(["input", "c1_w", "c1_b"], "c1", "conv1"), helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    return nodes, [tensor("c1_w", channels, 3, 3, 3), tensor("c1_b", channels)], channels


def weight_through(kind: str) -> Built:
    """conv2 (4 -> 6, 3x3) reads its weight through `kind`; the stored tensor is laid out to match."""
    nodes, tensors, _ = first_conv()
    oihw = rng().normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32)
    steps: list[onnx.NodeProto] = []
    if kind == "identity":
        tensors.append(numpy_helper.from_array(oihw, "w"))
        steps = [helper.make_node("Identity", ["w"], ["w_read"], name="w_identity")]
    elif kind == "constant":
        steps = [helper.make_node("Constant", [], ["w_read"], name="w_constant", value=numpy_helper.from_array(oihw))]
    elif kind == "cast":
        tensors.append(numpy_helper.from_array(oihw.astype(np.float16), "w"))
        steps = [helper.make_node("Cast", ["w"], ["w_read"], name="w_cast", to=TensorProto.FLOAT)]
    elif kind == "reshape":
        tensors += [
            numpy_helper.from_array(oihw.reshape(-1), "w"),
            numpy_helper.from_array(np.array([6, 4, 3, 3]), "s"),
        ]
        steps = [helper.make_node("Reshape", ["w", "s"], ["w_read"], name="w_reshape")]
    elif kind == "transpose":  # stored HWIO, as TensorFlow keeps kernels
        tensors.append(numpy_helper.from_array(oihw.transpose(2, 3, 1, 0).copy(), "w"))
        steps = [helper.make_node("Transpose", ["w"], ["w_read"], name="w_transpose", perm=[3, 2, 0, 1])]
    elif kind == "constant_cast_reshape_transpose":  # every step at once, from a float16 Constant
        stored = oihw.transpose(2, 3, 1, 0).reshape(-1).astype(np.float16)
        steps = [
            helper.make_node("Constant", [], ["w16"], name="w_constant", value=numpy_helper.from_array(stored)),
            helper.make_node("Cast", ["w16"], ["w32"], name="w_cast", to=TensorProto.FLOAT),
            helper.make_node(
                "Constant", [], ["s"], name="s_constant", value=numpy_helper.from_array(np.array([3, 3, 4, 6]))
            ),
            helper.make_node("Reshape", ["w32", "s"], ["hwio"], name="w_reshape"),
            helper.make_node("Transpose", ["hwio"], ["w_id"], name="w_transpose", perm=[3, 2, 0, 1]),
            helper.make_node("Identity", ["w_id"], ["w_read"], name="w_identity"),
        ]
    tensors.append(tensor("b2", 6))
    return [*nodes, *steps, conv(["r1", "w_read", "b2"], "features", "conv2")], tensors, 6


def shared_weights() -> Built:
    """Two Conv branches read one weight (one of them through Identity) and one bias, then add."""
    nodes, tensors, _ = first_conv()
    nodes += [
        conv(["r1", "w", "b"], "a", "conv_a"),
        helper.make_node("Identity", ["w"], ["w_again"], name="w_identity"),
        conv(["r1", "w_again", "b"], "b_out", "conv_b"),
        helper.make_node("Relu", ["b_out"], ["rb"], name="relu_b"),
        helper.make_node("Add", ["a", "rb"], ["features"], name="add"),
    ]
    return nodes, [*tensors, tensor("w", 5, 4, 3, 3), tensor("b", 5)], 5


def conv_variant(kind: str) -> Built:
    nodes, tensors, _ = first_conv()
    if kind == "no_bias":
        return [*nodes, conv(["r1", "w"], "features", "conv2")], [*tensors, tensor("w", 6, 4, 3, 3)], 6
    if kind == "grouped":  # 2 groups: 4 -> 6 channels, weight [6, 4/2, 3, 3]
        return (
            [*nodes, conv(["r1", "w", "b"], "features", "conv2", group=2)],
            [
                *tensors,
                tensor("w", 6, 2, 3, 3),
                tensor("b", 6),
            ],
            6,
        )
    if kind == "depthwise":  # depthwise 4 -> 4 (weight [4, 1, 3, 3]), then pointwise 4 -> 6
        nodes += [
            conv(["r1", "dw", "dw_b"], "d", "depthwise", group=4),
            helper.make_node("Relu", ["d"], ["rd"], name="relu_d"),
            helper.make_node("Conv", ["rd", "pw"], ["features"], name="pointwise"),
        ]
        return nodes, [*tensors, tensor("dw", 4, 1, 3, 3), tensor("dw_b", 4), tensor("pw", 6, 4, 1, 1)], 6
    if kind == "conv_transpose":  # 4 -> 5 channels, weight [in 4, out 5, 2, 2], doubling the size
        nodes.append(helper.make_node("ConvTranspose", ["r1", "w", "b"], ["features"], name="up", strides=[2, 2]))
        return nodes, [*tensors, tensor("w", 4, 5, 2, 2), tensor("b", 5)], 5
    if kind == "conv_transpose_grouped":  # 2 groups: 4 -> 6 channels, weight [4, 6/2, 3, 3], no bias
        nodes.append(
            helper.make_node("ConvTranspose", ["r1", "w"], ["features"], name="up", group=2, pads=[1, 1, 1, 1])
        )
        return nodes, [*tensors, tensor("w", 4, 3, 3, 3)], 6
    raise ValueError(kind)


def gemm_variant(kind: str) -> Built:
    """The hidden layer of an MLP on 12 features, 16 neurons, in the forms converters write."""
    if kind == "transB":  # [out, in] weights, alpha and beta not 1
        node = helper.make_node("Gemm", ["input", "w", "b"], ["features"], name="hidden", transB=1, alpha=0.5, beta=2.0)
        return [node], [tensor("w", 16, FEATURES), tensor("b", 16)], 16
    if kind == "transA":  # the input arrives transposed [in, batch]; [in, out] weights
        nodes = [
            helper.make_node("Transpose", ["input"], ["input_t"], name="to_columns", perm=[1, 0]),
            helper.make_node("Gemm", ["input_t", "w", "b"], ["features"], name="hidden", transA=1),
        ]
        return nodes, [tensor("w", FEATURES, 16), tensor("b", 16)], 16
    if kind == "transposed_weight":  # stored [in, out], a Transpose node makes it [out, in] for transB
        nodes = [
            helper.make_node("Transpose", ["w"], ["w_t"], name="w_transpose", perm=[1, 0]),
            helper.make_node("Gemm", ["input", "w_t", "b"], ["features"], name="hidden", transB=1),
        ]
        return nodes, [tensor("w", FEATURES, 16), tensor("b", 16)], 16
    if kind == "matmul_add":  # TensorFlow's Dense: MatMul with [in, out] weights, then Add
        nodes = [
            helper.make_node("MatMul", ["input", "w"], ["m"], name="dense/MatMul"),
            helper.make_node("Add", ["m", "b"], ["features"], name="dense/Add"),
        ]
        return nodes, [tensor("w", FEATURES, 16), tensor("b", 16)], 16
    if kind == "matmul_cast_weight":  # float16 weights cast for a float32 MatMul, bias first in the Add
        nodes = [
            helper.make_node("Cast", ["w"], ["w32"], name="w_cast", to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["input", "w32"], ["m"], name="dense/MatMul"),
            helper.make_node("Add", ["b", "m"], ["features"], name="dense/Add"),
        ]
        return nodes, [tensor("w", FEATURES, 16, dtype=np.float16), tensor("b", 16)], 16
    raise ValueError(kind)


def samples(shape: tuple[int, ...], count: int = 16) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(1)
    return generator.random((count, *shape), dtype=np.float32), generator.integers(0, CLASSES, count)


def save(model: onnx.ModelProto, folder: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    path = folder / f"{model.graph.name}.onnx"
    onnx.save(model, str(path))
    return path


CHAINS = ["identity", "constant", "cast", "reshape", "transpose", "constant_cast_reshape_transpose"]
CONVS = ["no_bias", "grouped", "depthwise", "conv_transpose", "conv_transpose_grouped"]
GEMMS = ["transB", "transA", "transposed_weight", "matmul_add", "matmul_cast_weight"]
IMAGE_BUILDERS: dict[str, Callable[[], Built]] = {
    **{f"weight_{kind}": (lambda kind=kind: weight_through(kind)) for kind in CHAINS},
    "shared_weights": shared_weights,
    **{kind: (lambda kind=kind: conv_variant(kind)) for kind in CONVS},
}


@pytest.mark.parametrize("variant", sorted(IMAGE_BUILDERS))
def test_image_graph_variants_round_trip(tmp_path, variant):
    path = save(image_model(IMAGE_BUILDERS[variant](), variant), tmp_path)
    checked = round_trip(path, *samples(IMAGE))
    assert len(checked.neuron_map.layers) >= 2, "the layer under test is prunable, not only conv1"


@pytest.mark.parametrize("variant", GEMMS)
def test_dense_graph_variants_round_trip(tmp_path, variant):
    path = save(vector_model(gemm_variant(variant), variant), tmp_path)
    checked = round_trip(path, *samples((FEATURES,)))
    assert [(layer.channels, layer.op_type in ("Gemm", "MatMul")) for layer in checked.neuron_map.layers] == [
        (16, True)
    ]


@pytest.mark.parametrize("kind", CHAINS)
def test_a_pruned_channel_is_zeroed_in_the_stored_tensor_and_the_chain_is_kept(kind):
    model = image_model(weight_through(kind), kind)
    neuron_map = build_neuron_map(model)
    conv2 = neuron_map.layer("conv2")
    rewritten = apply_plan(model, neuron_map, PruningPlan("one", (PrunedNeuron("conv2", 2, 0.0, 0.0),)))
    assert [node.op_type for node in rewritten.graph.node] == [node.op_type for node in model.graph.node]
    assert len(rewritten.graph.initializer) == len(model.graph.initializer), "edited in place, no copy"
    weight = Graph(rewritten).constant(rewritten.graph.node[conv2.node_index].input[1])
    before = Graph(model).constant(model.graph.node[conv2.node_index].input[1])
    assert not weight[2].any()
    assert np.array_equal(np.delete(weight, 2, axis=0), np.delete(before, 2, axis=0))
    assert conv2.weight == Graph(model).resolve_initializer(model.graph.node[conv2.node_index].input[1])


def test_a_shared_weight_is_copied_for_the_pruned_reader_only():
    model = image_model(shared_weights(), "shared")
    neuron_map = build_neuron_map(model)
    rewritten = apply_plan(model, neuron_map, PruningPlan("one", (PrunedNeuron("conv_a", 1, 0.0, 0.5),)))
    nodes = {node.name: node for node in rewritten.graph.node}
    assert nodes["conv_b"].input[1:] == ["w_again", "b"], "the other reader keeps the original tensors"
    assert nodes["conv_a"].input[1] != "w" and nodes["conv_a"].input[2] != "b"
    graph = Graph(rewritten)
    assert not graph.constant(nodes["conv_a"].input[1])[1].any()
    assert graph.constant(nodes["conv_a"].input[2])[1] == pytest.approx(0.5)
    assert np.array_equal(graph.constant("w"), Graph(model).constant("w"))


def test_grouped_and_depthwise_conv_neurons_are_output_channels():
    grouped = build_neuron_map(image_model(conv_variant("grouped"), "g")).layer("conv2")
    depthwise = build_neuron_map(image_model(conv_variant("depthwise"), "d")).layer("depthwise")
    assert (grouped.channels, grouped.weight_axis, grouped.weight_groups) == (6, 0, 1)
    assert (depthwise.channels, depthwise.weight_axis) == (4, 0)
    assert channel_entries(grouped, (6, 2, 3, 3), 4) == (4, slice(None), slice(None), slice(None))


def test_conv_transpose_neurons_index_weight_axis_one_within_their_group():
    plain = build_neuron_map(image_model(conv_variant("conv_transpose"), "t")).layer("up")
    grouped = build_neuron_map(image_model(conv_variant("conv_transpose_grouped"), "tg")).layer("up")
    assert (plain.channels, plain.weight_axis, plain.bias is not None) == (5, 1, True)
    assert (grouped.channels, grouped.weight_axis, grouped.weight_groups, grouped.bias) == (6, 1, 2, None)
    everything = slice(None)
    assert channel_entries(plain, (4, 5, 2, 2), 3) == (everything, 3, everything, everything)
    # output channel 4 is column 1 of group 1, whose input rows are 2 and 3
    assert channel_entries(grouped, (4, 3, 3, 3), 4) == (slice(2, 4), 1, everything, everything)
