"""A read-only index over an ONNX graph: producers, consumers, and the constants behind a tensor name.

Exporters rarely hand a Conv its weights straight from an initializer: PyTorch puts Identity nodes
on deduplicated tensors, TensorFlow converters write Transpose or Reshape of a stored kernel,
float16 models Cast their weights, and some tools store weights in Constant nodes. A `ConstantChain`
is such a path: a stored tensor (an initializer or a Constant node's value) and the pass-through
nodes that turn it into what the consumer reads. Every op on a chain only moves or casts values, so
each element a consumer reads comes from exactly one stored element (`source_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
from onnx import helper, numpy_helper

CHAIN_OPS = frozenset({"Identity", "Cast", "Reshape", "Transpose"})


@dataclass(frozen=True)
class ConstantChain:
    """`source`: an initializer's name, or the output of a Constant node; `nodes`: indices of the
    Identity/Cast/Reshape/Transpose nodes from the source to the tensor, in order."""

    source: str
    nodes: tuple[int, ...]


@dataclass
class Graph:
    """Read-only index over a ModelProto's main graph."""

    model: onnx.ModelProto

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)

    @cached_property
    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {tensor.name: tensor for tensor in self.model.graph.initializer}

    @cached_property
    def producer(self) -> dict[str, int]:
        """Tensor name -> index of the node that outputs it."""
        return {name: index for index, node in enumerate(self.model.graph.node) for name in node.output if name}

    @cached_property
    def consumers(self) -> dict[str, list[int]]:
        """Tensor name -> indices of the nodes that read it."""
        table: dict[str, list[int]] = {}
        for index, node in enumerate(self.model.graph.node):
            for name in node.input:
                if name:
                    table.setdefault(name, []).append(index)
        return table

    @cached_property
    def output_names(self) -> set[str]:
        return {output.name for output in self.model.graph.output}

    def chain(self, name: str) -> ConstantChain | None:
        """The stored tensor behind `name` and the pass-through nodes on the way; None if not constant."""
        nodes: list[int] = []
        while name not in self.initializers:
            index = self.producer.get(name)
            if index is None or index in nodes:
                return None
            node = self.model.graph.node[index]
            if node.op_type == "Constant":
                return ConstantChain(name, tuple(reversed(nodes))) if _constant_attribute(node) is not None else None
            if node.op_type not in CHAIN_OPS or not node.input:
                return None
            if node.op_type == "Reshape" and (len(node.input) < 2 or self.constant(node.input[1]) is None):
                return None
            nodes.append(index)
            name = node.input[0]
        return ConstantChain(name, tuple(reversed(nodes)))

    def resolve_initializer(self, name: str) -> str | None:
        """Name of the stored tensor behind `name` (see ConstantChain); None if it is not constant."""
        found = self.chain(name)
        return found.source if found else None

    def stored(self, source: str) -> onnx.TensorProto:
        """The TensorProto a chain starts from: the initializer, or the Constant node's tensor."""
        if source in self.initializers:
            return self.initializers[source]
        node = self.model.graph.node[self.producer[source]]
        return _constant_attribute(node)

    def constant(self, name: str) -> np.ndarray | None:
        """Value of a constant tensor as its consumer reads it, else None."""
        found = self.chain(name)
        if found is None:
            return None
        value = numpy_helper.to_array(self.stored(found.source))
        for index in found.nodes:
            value = self._apply(self.model.graph.node[index], value, cast=True)
        return value

    def source_positions(self, name: str) -> np.ndarray:
        """For each element of constant `name`, its flat position in the stored tensor behind it."""
        found = self.chain(name)
        if found is None:
            raise ValueError(f"{name} is not a constant")
        positions = np.arange(_element_count(self.stored(found.source))).reshape(self.stored(found.source).dims)
        for index in found.nodes:
            positions = self._apply(self.model.graph.node[index], positions, cast=False)
        return positions

    def _apply(self, node: onnx.NodeProto, value: np.ndarray, cast: bool) -> np.ndarray:
        if node.op_type == "Transpose":
            perm = attribute(node, "perm", None)
            return np.transpose(value, perm)
        if node.op_type == "Reshape":
            return value.reshape(_reshape_target(value.shape, self.constant(node.input[1]), node))
        if node.op_type == "Cast" and cast:
            return value.astype(helper.tensor_dtype_to_np_dtype(attribute(node, "to", onnx.TensorProto.FLOAT)))
        return value

    def uses(self, initializer: str) -> int:
        """How many node inputs and graph outputs read this tensor."""
        return len(self.consumers.get(initializer, [])) + (initializer in self.output_names)

    def node_label(self, index: int) -> str:
        node = self.model.graph.node[index]
        return node.name or f"{node.op_type}_{index}"


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that take data: those that are not initializers (IR < 4 lists every
    initializer among the graph inputs too, as an overridable default)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    """A node attribute's value, or `default` when the node does not set it."""
    for entry in node.attribute:
        if entry.name == name:
            return helper.get_attribute_value(entry)
    return default


def _constant_attribute(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a Constant node holds (its `value` attribute); None for the scalar/list forms."""
    for entry in node.attribute:
        if entry.name == "value":
            return entry.t
    return None


def _element_count(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64))


def _reshape_target(shape: tuple[int, ...], target: np.ndarray, node: onnx.NodeProto) -> list[int]:
    """Reshape's target with 0 (copy the input's dim, unless allowzero) resolved; -1 is left to numpy."""
    allow_zero = bool(attribute(node, "allowzero", 0))
    return [
        shape[position] if size == 0 and not allow_zero else int(size) for position, size in enumerate(target.tolist())
    ]
