"""Loading ONNX files, checking that they can be purified, and the copy of the graph that torch trains on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from anp_onnx.errors import AnpError, one_line
from anp_onnx.onnx.graph import Graph, data_inputs


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file (external data included) or raise AnpError saying why it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise AnpError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AnpError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises several unrelated types for corrupt files
        raise AnpError(f"{path}: not a readable ONNX model ({type(error).__name__}: {one_line(error)})") from None
    _check_external_locations(model, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as error:
        raise AnpError(f"{path}: cannot read its external data ({type(error).__name__}: {one_line(error)})") from None
    _check_tensor_sizes(model, path)
    if not model.graph.node:
        raise AnpError(f"{path}: the ONNX graph has no nodes")
    _check_structure(model, path)
    return model


def _check_structure(model: onnx.ModelProto, path: Path) -> None:
    """onnx's own checker (node arity, attributes, topological order) so that later stages can trust
    the graph's shape; models past protobuf's 2 GB are left to onnxruntime's loader."""
    if model.ByteSize() >= 2**31 - 1:
        return
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # ValidationError, and others for odd protobufs
        raise AnpError(f"{path}: not a valid ONNX model ({one_line(error)[:300]})") from None


def element_type_name(element_type: int) -> str:
    """'float', 'int64', ... for a TensorProto data type; unknown codes (from damaged files) by number."""
    try:
        return onnx.TensorProto.DataType.Name(element_type).lower()
    except ValueError:
        return f"unknown type {element_type}"


def _check_external_locations(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data locations that are absolute or leave the model's folder, before reading any."""
    folder = path.parent.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise AnpError(f"{path}: initializer {tensor.name!r} points outside the model's folder ({location!r})")


FOUR_BIT_TYPES = frozenset(
    getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)
)
COMPLEX_TYPES = frozenset({onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128})
TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Refuse initializers whose data does not hold as many values as their dims declare, before any is
    turned into an array (absurd dims would otherwise ask numpy for exabytes)."""
    for tensor in model.graph.initializer:
        problem = tensor_size_problem(tensor)
        if problem:
            raise AnpError(f"{path}: initializer {tensor.name!r} {problem}")


def tensor_size_problem(tensor: onnx.TensorProto) -> str | None:
    """Why the tensor's stored data cannot have the shape it declares, or None when it fits."""
    try:
        helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, TypeError, ValueError):
        return f"has data type {tensor.data_type}, which this onnx version does not know"
    dims = list(tensor.dims)
    if any(dim < 0 for dim in dims):
        return f"has a negative dimension {dims}"
    count = math.prod(dims)
    declared = f"declares {count} values {dims}"
    if tensor.HasField("raw_data"):
        expected = _raw_bytes(tensor.data_type, count)
        if expected is not None and expected != len(tensor.raw_data):
            return f"{declared} ({expected} bytes) but holds {len(tensor.raw_data)} bytes"
        return None
    stored = next((len(getattr(tensor, name)) for name in TYPED_FIELDS if len(getattr(tensor, name))), 0)
    expected = _typed_entries(tensor.data_type, count)
    if stored != expected:
        return f"{declared} but holds {stored} entries"
    return None


def _raw_bytes(data_type: int, count: int) -> int | None:
    """Bytes that `count` values of `data_type` take in raw_data; None for types without a fixed size."""
    if data_type in FOUR_BIT_TYPES:
        return (count + 1) // 2
    if data_type == onnx.TensorProto.STRING:
        return None
    try:
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _typed_entries(data_type: int, count: int) -> int:
    """Entries that `count` values take in the typed *_data fields."""
    if data_type in FOUR_BIT_TYPES:
        return (count + 1) // 2
    return 2 * count if data_type in COMPLEX_TYPES else count


def graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The model's single data input."""
    inputs = data_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(value.name for value in inputs) or "none"
        raise AnpError(f"the model must have exactly one data input, it has {len(inputs)} ({names})")
    return inputs[0]


IMAGE_INPUT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def input_shape(model: onnx.ModelProto) -> tuple[int | None, ...]:
    """Static dims of the data input; None for symbolic or unknown dims. The input must be float32 or float16."""
    input_dtype(model)
    tensor_type = graph_input(model).type.tensor_type
    return tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim)


def input_dtype(model: onnx.ModelProto) -> type[np.floating]:
    """numpy type of the data input (float32 or float16); AnpError for any other input."""
    value = graph_input(model)
    problem = input_problem(value)
    if problem:
        raise AnpError(
            f"input {value.name!r} is {problem}: anp-onnx handles models with a float32 or float16 image input"
        )
    return IMAGE_INPUT_TYPES[value.type.tensor_type.elem_type]


def input_problem(value: onnx.ValueInfoProto) -> str | None:
    """What makes a graph input unusable as an image input (its type), or None."""
    if not value.type.HasField("tensor_type"):
        return "not a tensor"
    element_type = value.type.tensor_type.elem_type
    if element_type not in IMAGE_INPUT_TYPES:
        return element_type_name(element_type) if element_type else "of unknown type"
    return None


QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
)
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
NAMED_IN_ERRORS = 3


def unsupported_reason(node: onnx.NodeProto) -> str | None:
    """Why anp-onnx cannot purify a graph holding this node, or None when the node is fine."""
    if node.domain not in STANDARD_DOMAINS:
        return f"custom op domain {node.domain!r}"
    if node.op_type in QUANTIZED_OPS:
        return "quantized graph"
    if node.op_type in CONTROL_FLOW_OPS:
        return "control flow"
    return None


def unsupported_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(node label, reason) for every node of the main graph that anp-onnx cannot purify yet."""
    graph = Graph(model)
    found = []
    for index, node in enumerate(graph.nodes):
        reason = unsupported_reason(node)
        if reason is not None:
            found.append((f"{graph.node_label(index)} ({node.op_type})", reason))
    return found


def unsupported_inputs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(input label, reason) for data inputs that are not one float image batch (token ids, masks, ...)."""
    inputs = data_inputs(model)
    found = []
    for value in inputs:
        problem = input_problem(value)
        if problem:
            found.append((f"input {value.name!r}", f"{problem} input, not an image"))
    if len(inputs) > 1:
        found.append((", ".join(f"input {value.name!r}" for value in inputs), "several data inputs, not one image"))
    return found


def check_supported(model: onnx.ModelProto, path: str | Path) -> None:
    """AnpError naming the first few nodes anp-onnx cannot handle (quantized, custom, control flow)."""
    found = unsupported_nodes(model)
    if not found:
        return
    named = "; ".join(f"{label}: {reason}" for label, reason in found[:NAMED_IN_ERRORS])
    more = f" and {len(found) - NAMED_IN_ERRORS} more" if len(found) > NAMED_IN_ERRORS else ""
    raise AnpError(f"{path}: cannot purify {len(found)} node(s) yet: {named}{more} (see `anp-onnx inspect`)")


def class_output_index(outputs: onnx.ModelProto | Sequence[str], name: str | None) -> int:
    """Position of the class output among the graph outputs: `name`, or the first when None. `outputs`
    is the model, or its output names (as an onnxruntime session lists them, in the graph's order)."""
    names = [value.name for value in outputs.graph.output] if isinstance(outputs, onnx.ModelProto) else list(outputs)
    if name is None:
        return 0
    if name not in names:
        raise AnpError(f"no output named {name!r}: the model's outputs are {', '.join(names)}")
    return names.index(name)
