"""Carry out a pruning plan in the ONNX initializers, and write files whole or not at all.

A pruned channel gets zero weights and, where its bias is per-channel, the bias that makes it output
the plan's constant. Only the initializers of pruned channels change; an initializer that other
nodes also read is copied first, and only this layer's node is pointed at the copy.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from anp_onnx.errors import AnpError
from anp_onnx.onnx.graph import Graph
from anp_onnx.onnx.neurons import Layer, NeuronMap, channel_entries, current_bias
from anp_onnx.prune import PruningPlan

VALUE_TOLERANCE = 1e-7
MAX_PROTOBUF_BYTES = 2**31 - 1
WEIGHT_INPUT = 1  # Conv/ConvTranspose/Gemm/MatMul weights and BatchNormalization's scale
BIAS_INPUT = 2  # Conv's and ConvTranspose's B, Gemm's C and BatchNormalization's B


def apply_plan(model: onnx.ModelProto, neuron_map: NeuronMap, plan: PruningPlan) -> onnx.ModelProto:
    """A copy of `model` with the plan's neurons pruned."""
    result = copy.deepcopy(model)
    if not plan.neurons:
        return result
    for layer in neuron_map.layers:
        neurons = [neuron for neuron in plan.neurons if neuron.layer == layer.name]
        if not neurons:
            continue
        channels = [neuron.channel for neuron in neurons]
        values = np.array([neuron.value for neuron in neurons])
        _prune_layer(result, layer, channels, values)
    return result


def _prune_layer(model: onnx.ModelProto, layer: Layer, channels: list[int], values: np.ndarray) -> None:
    graph = Graph(model)
    bias_now = current_bias(graph, layer)[channels]
    needs_bias = not np.allclose(bias_now, values, rtol=0, atol=VALUE_TOLERANCE)

    def zero_weights(weight: np.ndarray) -> None:
        for channel in channels:
            weight[channel_entries(layer, weight.shape, channel)] = 0

    edit_initializer(model, layer.node_index, WEIGHT_INPUT, zero_weights)
    if needs_bias:
        if not layer.bias_per_channel:
            raise AssertionError(f"{layer.name}: pruned value differs from its bias, which is not per channel")

        def set_bias(bias: np.ndarray) -> None:
            bias.reshape(-1)[channels] = values / layer.bias_scale

        edit_initializer(model, layer.output_node_index, bias_input(graph, layer), set_bias)


def bias_input(graph: Graph, layer: Layer) -> int:
    if layer.op_type != "MatMul":
        return BIAS_INPUT
    node = graph.nodes[layer.output_node_index]  # the Add that carries a MatMul's bias
    return next(position for position, name in enumerate(node.input) if graph.resolve_initializer(name) == layer.bias)


def edit_initializer(
    model: onnx.ModelProto, node_index: int, position: int, edit: Callable[[np.ndarray], None]
) -> None:
    """Apply `edit` to the constant one node input reads, in the stored tensor behind it (through
    Identity/Cast/Reshape/Transpose, see graph.ConstantChain). If anything else reads that tensor or
    a step of its chain, this node input is pointed at a new initializer holding the edited value."""
    graph = Graph(model)
    node = model.graph.node[node_index]
    name = node.input[position]
    source = graph.resolve_initializer(name)
    stored = numpy_helper.to_array(graph.stored(source))
    values = graph.constant(name).copy()
    edit(values)
    if stored.dtype != values.dtype:
        values = values.astype(stored.dtype).astype(values.dtype)  # what the stored precision keeps
    if is_shared(graph, name):
        copy_name = _fresh_name(graph, f"{source}_pruned_{node_index}")
        model.graph.initializer.append(numpy_helper.from_array(values, copy_name))
        node.input[position] = copy_name
        return
    if graph.chain(name).nodes:
        updated = np.empty_like(stored)
        updated.reshape(-1)[graph.source_positions(name).reshape(-1)] = values.reshape(-1)
    else:
        updated = values.astype(stored.dtype, copy=False)
    graph.stored(source).CopyFrom(numpy_helper.from_array(updated, graph.stored(source).name))


def is_shared(graph: Graph, tensor: str) -> bool:
    """True if any tensor on the chain from this node input to its stored tensor has other readers."""
    chain = graph.chain(tensor)
    names = [tensor, *(graph.nodes[index].input[0] for index in chain.nodes)]
    return any(graph.uses(name) > 1 for name in names)


def _fresh_name(graph: Graph, base: str) -> str:
    taken = set(graph.initializers) | set(graph.producer) | {value.name for value in graph.model.graph.input}
    name, counter = base, 1
    while name in taken:
        name, counter = f"{base}_{counter}", counter + 1
    return name


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder renamed into place: the old file or the new one, never half."""
    path = Path(path)
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _cannot_write(path, error) from None
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _cannot_write(path, error) from None
        raise


def _cannot_write(path: Path, error: OSError) -> AnpError:
    """The user-facing form of a failed write: full disk, read-only or missing folder, a folder in the way."""
    reason = error.strerror or str(error)
    return AnpError(f"cannot write {path}: {reason} (any previous file there is unchanged)")


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Save atomically; models over protobuf's 2 GB limit go to external data beside the file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise AnpError(f"{path.parent}: output folder does not exist")

    def write(temporary: Path) -> None:
        if model.ByteSize() < MAX_PROTOBUF_BYTES:
            temporary.write_bytes(model.SerializeToString())
            return
        data_name = f"{path.name}.data"
        to_save = copy.deepcopy(model)
        onnx.save_model(to_save, str(temporary), save_as_external_data=True, location=data_name)
        os.replace(temporary.parent / data_name, path.parent / data_name)

    write_atomically(path, write)


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text))
