"""The neuron map: which layers of an ONNX graph have prunable output channels, and where each
channel's weights and bias live in the initializers.

A neuron is one output channel. Its activation is `y_c = s_c(x) + b_c`: the weighted part `s_c`
(conv/matmul result, or `gamma_c * x_hat` for BatchNormalization) and the bias `b_c`. Pruning a
neuron makes it output a constant; `rewrite.py` zeroes the weight slice and, where the bias is
per-channel, writes the constant into it.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx

from anp_onnx.model import Graph

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


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


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
    if node.op_type == "ConvTranspose":
        return None, "ConvTranspose is not supported yet"
    if _feeds_batch_norm(graph, index):
        return None, ""  # its BatchNormalization carries the neurons
    weight_name = graph.resolve_initializer(node.input[1])
    weight = graph.initializers[weight_name]
    dims = list(weight.dims)
    if node.op_type == "Conv":
        bias = graph.resolve_initializer(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return _linear_layer(graph, index, label, weight_name, 0, dims[0], 1, bias, 1.0), ""
    if node.op_type == "Gemm":
        if len(dims) != 2:
            return None, "Gemm weight is not 2-D"
        trans_b = bool(_attribute(node, "transB", 0))
        channels = dims[0] if trans_b else dims[1]
        bias = graph.resolve_initializer(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        beta = float(_attribute(node, "beta", 1.0))
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
        candidate = graph.resolve_initializer(other)
        if candidate is not None and int(np.prod(graph.initializers[candidate].dims)) in (1, channels):
            output_index, bias = consumer, candidate
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
    per_channel = bias is not None and int(np.prod(graph.initializers[bias].dims)) == channels
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
    )


def _batch_norm_layer(graph: Graph, index: int, label: str) -> tuple[Layer | None, str]:
    node = graph.nodes[index]
    names = [graph.resolve_initializer(name) for name in node.input[1:5]]
    if len(names) < 4 or not all(names):
        return None, "BatchNormalization parameters are not constant initializers"
    if len(node.output) > 1 and any(node.output[1:]):
        return None, "BatchNormalization in training mode"
    scale, bias = names[0], names[1]
    channels = int(np.prod(graph.initializers[scale].dims))
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
