"""What `anp-onnx inspect` shows: producer, opset, inputs and outputs, the input preprocessing the graph
does itself, prunable layers, what is left alone and what cannot be purified yet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from anp_onnx.onnx.graph import Graph, attribute, data_inputs
from anp_onnx.onnx.model import element_type_name, load_model, unsupported_inputs, unsupported_nodes
from anp_onnx.onnx.neurons import build_neuron_map

ARITHMETIC = {"Sub": "-", "Div": "/", "Mul": "*", "Add": "+"}
PREPROCESSING_OPS = frozenset({"Transpose", "Cast", *ARITHMETIC})
NCHW_FROM_NHWC = [0, 3, 1, 2]
SHOWN_VALUES = 4


def _shape(value: onnx.ValueInfoProto) -> list[int | str | None]:
    dims = value.type.tensor_type.shape.dim
    return [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in dims]


def _element_type(value: onnx.ValueInfoProto) -> str:
    return element_type_name(value.type.tensor_type.elem_type)


def preprocessing(model: onnx.ModelProto) -> list[str]:
    """The steps between the data input and the first other node, when each is a layout Transpose,
    a Cast, or arithmetic with a constant (mean subtraction, scaling): what the data must not repeat."""
    graph = Graph(model)
    inputs = [value.name for value in data_inputs(model)]
    if len(inputs) != 1:
        return []
    steps, tensor = [], inputs[0]
    while len(consumers := graph.consumers.get(tensor, [])) == 1:
        node = graph.nodes[consumers[0]]
        if node.op_type not in PREPROCESSING_OPS:
            break
        step = _preprocessing_step(graph, node, tensor)
        if step is None:
            break
        steps.append(step)
        tensor = node.output[0]
    return steps


def _preprocessing_step(graph: Graph, node: onnx.NodeProto, tensor: str) -> str | None:
    if node.op_type == "Transpose":
        perm = list(attribute(node, "perm", []))
        return (
            "Transpose NHWC -> NCHW (the model takes channels-last images)"
            if perm == NCHW_FROM_NHWC
            else (f"Transpose perm {perm}")
        )
    if node.op_type == "Cast":
        return f"Cast to {element_type_name(int(attribute(node, 'to', 0)))}"
    others = [name for name in node.input if name != tensor]
    if len(others) != 1 or list(node.input).count(tensor) != 1:
        return None
    value = graph.constant(others[0])
    if value is None:
        return None
    operands = ("x", _show_values(value)) if node.input[0] == tensor else (_show_values(value), "x")
    return f"{node.op_type}: {operands[0]} {ARITHMETIC[node.op_type]} {operands[1]}"


def _show_values(value: np.ndarray) -> str:
    flat = value.reshape(-1)
    shown = ", ".join(f"{float(entry):.6g}" for entry in flat[:SHOWN_VALUES])
    more = f", ... ({flat.size} values)" if flat.size > SHOWN_VALUES else ""
    return f"[{shown}{more}]" if value.ndim else shown


def describe(model_path: str | Path) -> dict[str, object]:
    model = load_model(model_path)
    neuron_map = build_neuron_map(model)
    return {
        "model": str(model_path),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        "inputs": [
            {"name": value.name, "shape": _shape(value), "type": _element_type(value)} for value in data_inputs(model)
        ],
        "outputs": [
            {"name": value.name, "shape": _shape(value), "type": _element_type(value)} for value in model.graph.output
        ],
        "preprocessing": preprocessing(model),
        "layers": [
            {"name": layer.name, "op_type": layer.op_type, "neurons": layer.channels} for layer in neuron_map.layers
        ],
        "total_neurons": neuron_map.total_neurons,
        "not_pruned": [{"node": node, "reason": reason} for node, reason in neuron_map.skipped],
        "unsupported": [
            {"node": node, "reason": reason} for node, reason in [*unsupported_inputs(model), *unsupported_nodes(model)]
        ],
    }


def as_text(description: dict[str, object]) -> str:
    lines = [f"model     {description['model']}", f"producer  {description['producer'] or 'unknown'}"]
    lines.append("opset     " + ", ".join(f"{domain} {version}" for domain, version in description["opset"].items()))
    for kind in ("inputs", "outputs"):
        for value in description[kind]:
            shape = "x".join("?" if dim is None else str(dim) for dim in value["shape"])
            lines.append(f"{kind[:-1]:<9} {value['name']}  {value['type']}[{shape}]")
    if description["preprocessing"]:
        lines.append("the graph preprocesses its input:")
        lines.extend(f"  {step}" for step in description["preprocessing"])
    lines.append(f"prunable layers: {len(description['layers'])}, neurons: {description['total_neurons']}")
    lines.extend(f"  {layer['op_type']:<18} {layer['neurons']:>5}  {layer['name']}" for layer in description["layers"])
    if description["not_pruned"]:
        lines.append("left alone:")
        lines.extend(f"  {entry['node']}: {entry['reason']}" for entry in description["not_pruned"])
    if description["unsupported"]:
        lines.append("cannot purify yet:")
        lines.extend(f"  {entry['node']}: {entry['reason']}" for entry in description["unsupported"])
    return "\n".join(lines)
