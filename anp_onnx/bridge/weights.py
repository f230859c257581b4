"""Which torch parameters of the converted model are which ONNX initializers, so that weights changed in
torch (the repair stage) can be written back into the user's file with nothing else changed.

onnx2torch names each converted module after its node (`node_<index>`, see normalise.py); a module's
parameter is matched to the node input whose constant holds the same values, as stored or transposed
(Gemm with transB=0 becomes a Linear holding the transposed matrix). Constants that onnx2torch keeps as
buffers and feeds to a module as an argument (MatMul's weights, Add's bias) are made parameters when
one module alone reads them. Constants that another node or a
graph output also reads are left out: changing one reader would change the others, or need a new
initializer, and the graph must stay as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import fx, nn

from anp_onnx.bridge.importer import GatedClassifier
from anp_onnx.onnx.graph import Graph
from anp_onnx.onnx.rewrite import is_shared

MATCH_TOLERANCE = 1e-6  # relative: float16 weights are compared after the same rounding


@dataclass(frozen=True)
class WeightSlot:
    """One trainable tensor: torch parameter `parameter` holds what input `position` of node `node_index`
    reads (transposed when `transposed`)."""

    node_index: int
    position: int
    transposed: bool
    parameter: str  # qualified name in the classifier's graph module
    initializer: str  # the stored tensor behind the node input


@dataclass(frozen=True)
class WeightUpdate:
    """New values for one node input's constant, as the node reads it."""

    node_index: int
    position: int
    values: np.ndarray


def weight_slots(classifier: GatedClassifier, model: onnx.ModelProto) -> list[WeightSlot]:
    """Every parameter of the converted model that maps to a constant node input only its node reads."""
    graph = Graph(model)
    slots = []
    for index, node in enumerate(graph.nodes):
        try:
            module = classifier.graph_module.get_submodule(f"node_{index}")
        except AttributeError:
            continue
        for name, parameter in module.named_parameters(recurse=False):
            slot = _matching_input(graph, index, node, parameter, f"node_{index}.{name}")
            if slot is not None:
                slots.append(slot)
    buffers = dict(classifier.graph_module.named_buffers())
    for target, index in _constant_arguments(classifier.graph_module):
        tensor = buffers[target] if target in buffers else classifier.graph_module.get_parameter(target)
        slot = _matching_input(graph, index, graph.nodes[index], tensor, target)
        if slot is not None and slot.parameter not in {taken.parameter for taken in slots}:
            if target in buffers:  # promoted once; a later call finds it as a parameter
                _make_parameter(classifier.graph_module, target)
            slots.append(slot)
    return slots


def _constant_arguments(graph_module: nn.Module) -> list[tuple[str, int]]:
    """(name, node index) for the floating-point buffers (or buffers promoted to parameters by an earlier
    `weight_slots`) that exactly one converted node reads."""
    if not isinstance(graph_module, fx.GraphModule):
        return []
    found = []
    for node in graph_module.graph.nodes:
        if node.op != "get_attr" or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or not str(user.target).startswith("node_"):
            continue
        try:
            tensor = graph_module.get_buffer(node.target)
        except AttributeError:
            try:
                tensor = graph_module.get_parameter(node.target)
            except AttributeError:
                continue
        if tensor.is_floating_point():
            found.append((str(node.target), int(str(user.target).removeprefix("node_"))))
    return found


def _make_parameter(graph_module: nn.Module, target: str) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = graph_module.get_submodule(parent_name) if parent_name else graph_module
    value = parent._buffers.pop(leaf)
    parent.register_parameter(leaf, nn.Parameter(value, requires_grad=False))


def _matching_input(
    graph: Graph, index: int, node: onnx.NodeProto, parameter: torch.Tensor, qualified: str
) -> WeightSlot | None:
    values = parameter.detach().cpu().double().numpy()
    for position, name in enumerate(node.input):
        if not name:
            continue
        constant = graph.constant(name)
        if constant is None or is_shared(graph, name):
            continue
        constant = np.asarray(constant, dtype=np.float64)
        for transposed in (False, True):
            candidate = constant.T if transposed else constant
            if candidate.shape == values.shape and _close(candidate, values):
                return WeightSlot(
                    index, position, transposed and constant.ndim > 1, qualified, graph.resolve_initializer(name)
                )
    return None


def _close(left: np.ndarray, right: np.ndarray) -> bool:
    scale = max(1.0, float(np.max(np.abs(left))) if left.size else 1.0)
    return bool(np.max(np.abs(left - right), initial=0.0) <= MATCH_TOLERANCE * scale)


def trainable_parameters(classifier: GatedClassifier, slots: list[WeightSlot]) -> list[nn.Parameter]:
    parameters = dict(classifier.graph_module.named_parameters())
    return [parameters[slot.parameter] for slot in slots]


def weight_updates(classifier: GatedClassifier, slots: list[WeightSlot]) -> list[WeightUpdate]:
    """The current values of every slot's parameter, laid out as its node input reads them."""
    parameters = dict(classifier.graph_module.named_parameters())
    updates = []
    for slot in slots:
        values = parameters[slot.parameter].detach().float().cpu().numpy()
        updates.append(WeightUpdate(slot.node_index, slot.position, values.T.copy() if slot.transposed else values))
    return updates


def snapshot(parameters: list[nn.Parameter]) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in parameters]


def restore(parameters: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(parameters, values, strict=True):
            parameter.copy_(value)
