"""What `anp-onnx inspect` shows: inputs, outputs, prunable layers and what is left alone."""

from __future__ import annotations

from pathlib import Path

import onnx

from anp_onnx.model import element_type_name, load_model, unsupported_nodes
from anp_onnx.neurons import build_neuron_map


def _shape(value: onnx.ValueInfoProto) -> list[int | str | None]:
    dims = value.type.tensor_type.shape.dim
    return [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in dims]


def _element_type(value: onnx.ValueInfoProto) -> str:
    return element_type_name(value.type.tensor_type.elem_type)


def describe(model_path: str | Path) -> dict[str, object]:
    model = load_model(model_path)
    neuron_map = build_neuron_map(model)
    initializers = {tensor.name for tensor in model.graph.initializer}
    return {
        "model": str(model_path),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        "inputs": [
            {"name": value.name, "shape": _shape(value), "type": _element_type(value)}
            for value in model.graph.input
            if value.name not in initializers
        ],
        "outputs": [
            {"name": value.name, "shape": _shape(value), "type": _element_type(value)} for value in model.graph.output
        ],
        "layers": [
            {"name": layer.name, "op_type": layer.op_type, "neurons": layer.channels} for layer in neuron_map.layers
        ],
        "total_neurons": neuron_map.total_neurons,
        "not_pruned": [{"node": node, "reason": reason} for node, reason in neuron_map.skipped],
        "unsupported": [{"node": node, "reason": reason} for node, reason in unsupported_nodes(model)],
    }


def as_text(description: dict[str, object]) -> str:
    lines = [f"model     {description['model']}", f"producer  {description['producer'] or 'unknown'}"]
    lines.append("opset     " + ", ".join(f"{domain} {version}" for domain, version in description["opset"].items()))
    for kind in ("inputs", "outputs"):
        for value in description[kind]:
            shape = "x".join("?" if dim is None else str(dim) for dim in value["shape"])
            lines.append(f"{kind[:-1]:<9} {value['name']}  {value['type']}[{shape}]")
    lines.append(f"prunable layers: {len(description['layers'])}, neurons: {description['total_neurons']}")
    lines.extend(f"  {layer['op_type']:<18} {layer['neurons']:>5}  {layer['name']}" for layer in description["layers"])
    if description["not_pruned"]:
        lines.append("left alone:")
        lines.extend(f"  {entry['node']}: {entry['reason']}" for entry in description["not_pruned"])
    if description["unsupported"]:
        lines.append("cannot purify yet:")
        lines.extend(f"  {entry['node']}: {entry['reason']}" for entry in description["unsupported"])
    return "\n".join(lines)
