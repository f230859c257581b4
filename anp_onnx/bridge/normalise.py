"""The copy of an ONNX graph that onnx2torch converts and torch optimises on; the user's model is never changed.

What vendors ship differs from what onnx2torch accepts in a few mechanical ways, each undone here
without changing what the graph computes:

- weights behind Identity/Cast/Reshape/Transpose nodes or in Constant nodes: folded into initializers
  (onnx2torch reads Conv and Gemm weights from initializers only);
- float16: turned into float32, so that masks are optimised in float32 (the rewriter writes float16 back);
- Reshape with `allowzero=1` (the dynamo exporter's default) whose target has no zero: the flag changes
  nothing there and onnx2torch refuses it, so it is dropped;
- a fixed batch size: made dynamic, and Reshape targets that carry it through written with -1, so that
  masks can be optimised on batches of any size.

Nodes are named `node_<index>` after their position in the original graph, so that the converted
module of a layer can be found from the neuron map.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from anp_onnx.onnx.graph import CHAIN_OPS, Graph, attribute, data_inputs

FLOAT16 = onnx.TensorProto.FLOAT16
FLOAT = onnx.TensorProto.FLOAT


def normalised_for_torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` that onnx2torch can convert and torch can optimise on (see the module docstring)."""
    graph = Graph(model)
    result = copy.deepcopy(model)
    for index, node in enumerate(result.graph.node):
        node.name = f"node_{index}"
    _fold_constants(graph, result)
    _drop_allowzero(result)
    _make_batch_dynamic(model, result)
    _to_float32(result)
    _drop_unused_initializers(result)
    return result


def _fold_constants(graph: Graph, result: onnx.ModelProto) -> None:
    """Replace Constant nodes and pass-through chains over stored constants by initializers of their value."""
    keep, folded = [], []
    for node in result.graph.node:
        output = node.output[0] if node.output else ""
        foldable = node.op_type in CHAIN_OPS | {"Constant"} and len(node.output) == 1
        if foldable and output not in graph.output_names and graph.chain(output) is not None:
            folded.append(numpy_helper.from_array(np.asarray(graph.constant(output)), output))
            continue
        keep.append(node)
    del result.graph.node[:]
    result.graph.node.extend(keep)
    result.graph.initializer.extend(folded)


def _drop_allowzero(result: onnx.ModelProto) -> None:
    graph = Graph(result)
    for node in result.graph.node:
        if node.op_type != "Reshape" or not attribute(node, "allowzero", 0):
            continue
        target = graph.constant(node.input[1])
        if target is not None and 0 not in target.tolist():
            _remove_attribute(node, "allowzero")


def _make_batch_dynamic(original: onnx.ModelProto, result: onnx.ModelProto) -> None:
    """A fixed batch size B becomes a symbolic dim; a Reshape whose input and output both lead with B
    (shapes inferred on the original) gets the target [-1, rest...]."""
    inputs = data_inputs(result)
    if len(inputs) != 1 or not inputs[0].type.tensor_type.shape.dim:
        return
    first = inputs[0].type.tensor_type.shape.dim[0]
    if not first.HasField("dim_value"):
        return
    batch = first.dim_value
    shapes = _inferred_shapes(original)
    graph = Graph(result)
    for node in result.graph.node:
        if node.op_type != "Reshape" or graph.constant(node.input[1]) is None:
            continue
        before, after = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not before or not after or before[0] != batch or after[0] != batch or None in after:
            continue
        target = np.array([-1, *after[1:]], dtype=np.int64)
        name = f"{node.output[0]}_any_batch_shape"
        result.graph.initializer.append(numpy_helper.from_array(target, name))
        node.input[1] = name
    for value in [*inputs, *result.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = "batch"
    del result.graph.value_info[:]


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # inference is a help here, not a requirement
        return {}
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return {
        value.name: [dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim]
        for value in values
        if value.type.HasField("tensor_type")
    }


def _to_float32(result: onnx.ModelProto) -> None:
    """float16 initializers, Constant values, Casts, inputs and outputs become float32."""
    for position, tensor in enumerate(result.graph.initializer):
        if tensor.data_type == FLOAT16:
            as_float = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
            result.graph.initializer[position].CopyFrom(as_float)
    for node in result.graph.node:
        for entry in node.attribute:
            if entry.name == "to" and node.op_type == "Cast" and entry.i == FLOAT16:
                entry.i = FLOAT
            if entry.type == onnx.AttributeProto.TENSOR and entry.t.data_type == FLOAT16:
                entry.t.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(entry.t).astype(np.float32), entry.t.name)
                )
    for value in [*result.graph.input, *result.graph.output, *result.graph.value_info]:
        if value.type.tensor_type.elem_type == FLOAT16:
            value.type.tensor_type.elem_type = FLOAT


def _drop_unused_initializers(result: onnx.ModelProto) -> None:
    """Initializers no node reads any more (the sources of folded chains), and their graph inputs in old IRs."""
    used = {name for node in result.graph.node for name in node.input} | {value.name for value in result.graph.output}
    dropped = {tensor.name for tensor in result.graph.initializer} - used
    kept = [tensor for tensor in result.graph.initializer if tensor.name not in dropped]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept)
    inputs = [value for value in result.graph.input if value.name not in dropped]
    del result.graph.input[:]
    result.graph.input.extend(inputs)


def _remove_attribute(node: onnx.NodeProto, name: str) -> None:
    kept = [entry for entry in node.attribute if entry.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
