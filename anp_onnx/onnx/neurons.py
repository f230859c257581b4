"""The neuron map: which layers of an ONNX graph have prunable output channels, and where each
channel's weights and bias live in the initializers.

A neuron is one output channel. Its activation is `y_c = s_c(x) + b_c`: the weighted part `s_c`
(conv/matmul result, or `gamma_c * x_hat` for BatchNormalization) and the bias `b_c`. Pruning a
neuron makes it output a constant; `rewrite.py` zeroes the weight entries that feed it
(`channel_entries`) and, where the bias is per-channel, writes the constant into it.

Grouped and depthwise Conv are no exception: each output channel has its own filter
(weight[c] reads only its group's inputs), so a neuron is one output channel and nothing else has
to be zeroed with it. Channels are zeroed, not removed, so the coupling that structural pruning
must respect (a depthwise layer's input c is its output c) does not arise: the next layer keeps
reading the constant. ConvTranspose keeps its weight as [in, out/groups, ...]: the output channel
is on axis 1, inside its group's block of input rows.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx

from anp_onnx.onnx.graph import Graph, attribute

WEIGHT_OPS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})


@dataclass(frozen=True)
class Layer:
    """One prunable layer: a node whose output channels are neurons."""

    name: str
    op_type: str
    node_index: int
    output_node_index: int  # the node whose output carries the activations (an Add after MatMul)
    channels: int
    channel_axis: int  # axis of the activation that indexes channels
    weight: str  # initializer zeroed for a pruned channel (BatchNormalization: its scale)
    weight_axis: int  # axis of `weight` that indexes output channels
    bias: str | None  # initializer that adds the bias (BatchNormalization: B)
    bias_scale: float = 1.0  # the bias enters as bias_scale * bias (Gemm's beta)
    bias_per_channel: bool = False  # True when bias has one entry per channel and can be rewritten
    batch_normalised: bool = False  # a BatchNormalization node: normalises with its own statistics
    weight_groups: int = 1  # ConvTranspose with groups: see channel_entries
    bias_dtype: str = "float32"  # how the bias is stored: the precision a pruned channel's constant is written in


@dataclass(frozen=True)
class NeuronMap:
    """Prunable layers in graph order, plus what was looked at and left alone, with the reason."""

    layers: tuple[Layer, ...]
    skipped: tuple[tuple[str, str], ...]

    @property
    def total_neurons(self) -> int:
        return sum(layer.channels for layer in self.layers)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def channel_entries(layer: Layer, weight_shape: tuple[int, ...], channel: int) -> tuple[slice | int, ...]:
    """Index of the weight entries that feed output channel `channel` (as the layer's node reads its weight).

    Conv (grouped and depthwise included), Gemm and MatMul: one slice along `weight_axis`, since every
    output channel has its own filter whatever the groups. ConvTranspose's weight is
    [in, out/groups, ...]: channel c of group g = c // (out/groups) is column c % (out/groups) of that
    group's block of input rows.
    """
    index: list[slice | int] = [slice(None)] * len(weight_shape)
    if layer.weight_groups == 1:
        index[layer.weight_axis] = channel
        return tuple(index)
    per_group_out = weight_shape[layer.weight_axis]
    per_group_in = weight_shape[0] // layer.weight_groups
    group = channel // per_group_out
    index[0] = slice(group * per_group_in, (group + 1) * per_group_in)
    index[layer.weight_axis] = channel % per_group_out
    return tuple(index)


def current_bias(graph: Graph, layer: Layer) -> np.ndarray:
    """The bias each channel adds today, as a float64 vector of length `channels`."""
    if layer.bias is None:
        return np.zeros(layer.channels)
    values = graph.constant(layer.bias).astype(np.float64).reshape(-1) * layer.bias_scale
    return np.broadcast_to(values, (layer.channels,)).copy()


def build_neuron_map(model: onnx.ModelProto) -> NeuronMap:
    """Find every prunable layer; the classifier head (layers that reach a graph output without
    passing another weight layer) is skipped, since its outputs are the classes."""
    graph = Graph(model)
    candidates: list[Layer] = []
    skipped: list[tuple[str, str]] = []
    for index, node in enumerate(graph.nodes):
        if node.op_type not in WEIGHT_OPS | {"BatchNormalization"}:
            continue
        layer, reason = _layer_of(graph, index)
        if layer is None:
            if reason:
                skipped.append((graph.node_label(index), reason))
            continue
        candidates.append(layer)
    layers = []
    for layer in candidates:
        if _reaches_output(graph, graph.nodes[layer.output_node_index].output[0]):
            skipped.append((layer.name, "classifier head: its outputs are the classes"))
        else:
            layers.append(layer)
    return NeuronMap(tuple(_unique_names(layers)), tuple(skipped))


def _unique_names(layers: list[Layer]) -> list[Layer]:
    seen: dict[str, int] = {}
    result = []
    for layer in layers:
        count = seen.get(layer.name, 0)
        seen[layer.name] = count + 1
        if count:
            layer = _replace(layer, name=f"{layer.name}#{layer.node_index}")
        result.append(layer)
    return result


def _replace(layer: Layer, **changes: object) -> Layer:
    return dataclasses.replace(layer, **changes)


def stored_dtype(graph: Graph, source: str) -> str:
    """numpy name of the element type a stored constant is kept in ('float32', 'float16', ...)."""
    return str(onnx.helper.tensor_dtype_to_np_dtype(graph.stored(source).data_type))


def _single_consumer(graph: Graph, tensor: str) -> int | None:
    consumers = graph.consumers.get(tensor, [])
    if len(consumers) == 1 and tensor not in graph.output_names:
        return consumers[0]
    return None


def _feeds_batch_norm(graph: Graph, index: int) -> bool:
    consumer = _single_consumer(graph, graph.nodes[index].output[0])
    if consumer is None:
        return False
    node = graph.nodes[consumer]
    return node.op_type == "BatchNormalization" and all(graph.resolve_initializer(name) for name in node.input[1:5])


def _layer_of(graph: Graph, index: int) -> tuple[Layer | None, str]:
    node = graph.nodes[index]
    label = graph.node_label(index)
    if node.op_type == "BatchNormalization":
        return _batch_norm_layer(graph, index, label)
    if len(node.input) < 2 or graph.resolve_initializer(node.input[1]) is None:
        return None, "weights are not a constant initializer"
    if _feeds_batch_norm(graph, index):
        return None, ""  # its BatchNormalization carries the neurons
    weight_name = graph.resolve_initializer(node.input[1])
    dims = list(graph.constant(node.input[1]).shape)
    bias_input = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = graph.resolve_initializer(bias_input) if bias_input else None
    if node.op_type == "Conv":
        return _linear_layer(graph, index, label, weight_name, 0, dims[0], 1, bias, 1.0), ""
    if node.op_type == "ConvTranspose":
        groups = int(attribute(node, "group", 1))
        layer = _linear_layer(graph, index, label, weight_name, 1, dims[1] * groups, 1, bias, 1.0)
        return _replace(layer, weight_groups=groups), ""
    if node.op_type == "Gemm":
        if len(dims) != 2:
            return None, "Gemm weight is not 2-D"
        trans_b = bool(attribute(node, "transB", 0))
        channels = dims[0] if trans_b else dims[1]
        beta = float(attribute(node, "beta", 1.0))
        return _linear_layer(graph, index, label, weight_name, 0 if trans_b else 1, channels, -1, bias, beta), ""
    # MatMul with a constant [in, out] right operand; a following Add of a constant is its bias.
    if len(dims) != 2:
        return None, "MatMul weight is not 2-D"
    channels = dims[1]
    output_index, bias = index, None
    consumer = _single_consumer(graph, node.output[0])
    if consumer is not None and graph.nodes[consumer].op_type == "Add":
        add = graph.nodes[consumer]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        value = graph.constant(other)
        if value is not None and value.size in (1, channels):
            output_index, bias = consumer, graph.resolve_initializer(other)
    layer = _linear_layer(graph, index, label, weight_name, 1, channels, -1, bias, 1.0)
    return _replace(layer, output_node_index=output_index), ""


def _linear_layer(
    graph: Graph,
    index: int,
    label: str,
    weight: str,
    weight_axis: int,
    channels: int,
    channel_axis: int,
    bias: str | None,
    bias_scale: float,
) -> Layer:
    per_channel = bias is not None and graph.constant(bias).size == channels
    return Layer(
        name=label,
        op_type=graph.nodes[index].op_type,
        node_index=index,
        output_node_index=index,
        channels=channels,
        channel_axis=channel_axis,
        weight=weight,
        weight_axis=weight_axis,
        bias=bias,
        bias_scale=bias_scale,
        bias_per_channel=per_channel,
        bias_dtype=stored_dtype(graph, bias) if bias else "float32",
    )


def _batch_norm_layer(graph: Graph, index: int, label: str) -> tuple[Layer | None, str]:
    node = graph.nodes[index]
    names = [graph.resolve_initializer(name) for name in node.input[1:5]]
    if len(names) < 4 or not all(names):
        return None, "BatchNormalization parameters are not constant initializers"
    if len(node.output) > 1 and any(node.output[1:]):
        return None, "BatchNormalization in training mode"
    scale, bias = names[0], names[1]
    channels = graph.constant(scale).size
    layer = Layer(
        name=label,
        op_type="BatchNormalization",
        node_index=index,
        output_node_index=index,
        channels=channels,
        channel_axis=1,
        weight=scale,
        weight_axis=0,
        bias=bias,
        bias_per_channel=True,
        batch_normalised=True,
        bias_dtype=stored_dtype(graph, bias),
    )
    return layer, ""


def _reaches_output(graph: Graph, tensor: str) -> bool:
    """True if `tensor` flows into a graph output without passing through another weight layer."""
    queue, seen = deque([tensor]), {tensor}
    while queue:
        name = queue.popleft()
        if name in graph.output_names:
            return True
        for index in graph.consumers.get(name, []):
            node = graph.nodes[index]
            if node.op_type in WEIGHT_OPS and len(node.input) > 1 and graph.resolve_initializer(node.input[1]):
                continue
            for output in node.output:
                if output and output not in seen:
                    seen.add(output)
                    queue.append(output)
    return False
