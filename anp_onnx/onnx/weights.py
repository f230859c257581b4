"""Write changed weights into the ONNX initializers: the same graph (nodes, inputs, outputs, opset), only
the values of the stored tensors behind the given node inputs change (through Identity/Cast/Reshape/
Transpose chains, in their stored precision)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx

from anp_onnx.onnx.graph import Graph
from anp_onnx.onnx.rewrite import edit_initializer, is_shared


@dataclass(frozen=True)
class InitializerChange:
    """How much one stored tensor changed: ||new - old|| / ||old|| (old all zero: ||new||)."""

    initializer: str
    relative_change: float
    elements: int


def apply_weights(model: onnx.ModelProto, updates: list) -> tuple[onnx.ModelProto, list[InitializerChange]]:
    """A copy of `model` whose node inputs read `updates` (`WeightUpdate`s: node index, input position,
    values as the node reads them); unchanged values are left as they are. Shared constants are refused:
    writing them would change other readers too."""
    result = copy.deepcopy(model)
    changes = []
    for update in updates:
        graph = Graph(result)
        name = result.graph.node[update.node_index].input[update.position]
        if is_shared(graph, name):
            raise ValueError(f"{name} is read by other nodes too: its weights cannot change alone")
        old = np.asarray(graph.constant(name), dtype=np.float64)
        new = np.asarray(update.values, dtype=np.float64).reshape(old.shape)
        if np.array_equal(old, new):
            continue

        def write(values: np.ndarray, new: np.ndarray = new) -> None:
            values[...] = new

        edit_initializer(result, update.node_index, update.position, write)
        norm = float(np.linalg.norm(old))
        difference = float(np.linalg.norm(new - old))
        changes.append(
            InitializerChange(graph.resolve_initializer(name), difference / norm if norm else difference, old.size)
        )
    return result, changes
