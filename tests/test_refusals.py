"""Graphs anp-onnx cannot purify yet (quantized, custom ops, control flow) are refused in one line,
exit code 2, nothing written; `inspect` names the nodes."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import random_samples
from onnx import TensorProto, helper, numpy_helper

from anp_onnx.cli.main import main

SHAPE = (1, 6, 6)


def constant(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def quantize(source: str, target: str) -> list[onnx.NodeProto]:
    return [helper.make_node("QuantizeLinear", [source, "scale", "zero"], [target], name=f"quantize_{source}")]


def qdq() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    nodes = [*quantize("r", "rq"), helper.make_node("DequantizeLinear", ["rq", "scale", "zero"], ["m"], name="dq")]
    return nodes, []


def qlinear_conv() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    inputs = ["rq", "scale", "zero", "wq", "scale", "zero", "scale", "zero"]
    nodes = [
        *quantize("r", "rq"),
        helper.make_node("QLinearConv", inputs, ["cq"], name="qconv", pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["cq", "scale", "zero"], ["m"], name="dq"),
    ]
    return nodes, [constant("wq", np.ones((4, 4, 3, 3)), np.uint8)]


def qlinear_matmul() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    inputs = ["rq", "scale", "zero", "wq", "scale", "zero", "scale", "zero"]
    nodes = [
        *quantize("r", "rq"),
        helper.make_node("QLinearMatMul", inputs, ["mq"], name="qmatmul"),
        helper.make_node("DequantizeLinear", ["mq", "scale", "zero"], ["m"], name="dq"),
    ]
    return nodes, [constant("wq", np.eye(6), np.uint8)]


def integer_op(op_type: str, weight: np.ndarray) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    nodes = [
        *quantize("r", "rq"),
        helper.make_node(op_type, ["rq", "wq"], ["iq"], name="integer"),
        helper.make_node("Cast", ["iq"], ["m"], name="cast", to=TensorProto.FLOAT),
    ]
    return nodes, [constant("wq", weight, np.uint8)]


def custom_op() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    return [helper.make_node("FancyActivation", ["r"], ["m"], name="fancy", domain="com.example")], []


def if_op() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    def branch(name: str) -> onnx.GraphProto:
        output = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)
        return helper.make_graph([helper.make_node("Identity", ["r"], [f"{name}_out"])], name, [], [output])

    node = helper.make_node(
        "If", ["flag"], ["m"], name="branch", then_branch=branch("then"), else_branch=branch("else")
    )
    return [node], [constant("flag", True, np.bool_)]


def loop_op() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Relu", ["v_in"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )
    node = helper.make_node("Loop", ["trips", "", "r"], ["m"], name="repeat", body=body)
    return [node], [constant("trips", 2, np.int64)]


def scan_op() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    body = helper.make_graph(
        [helper.make_node("Relu", ["slice"], ["slice_out"])],
        "body",
        [helper.make_tensor_value_info("slice", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("slice_out", TensorProto.FLOAT, None)],
    )
    return [helper.make_node("Scan", ["r"], ["m"], name="per_sample", body=body, num_scan_inputs=1)], []


OFFENDERS = {
    "QuantizeLinear": (qdq, "quantize_r"),
    "QLinearConv": (qlinear_conv, "qconv"),
    "QLinearMatMul": (qlinear_matmul, "qmatmul"),
    "ConvInteger": (lambda: integer_op("ConvInteger", np.ones((4, 4, 1, 1))), "integer"),
    "MatMulInteger": (lambda: integer_op("MatMulInteger", np.eye(6)), "integer"),
    "FancyActivation": (custom_op, "fancy"),
    "If": (if_op, "branch"),
    "Loop": (loop_op, "repeat"),
    "Scan": (scan_op, "per_sample"),
}


def conv_model_around(middle: tuple[list[onnx.NodeProto], list[onnx.TensorProto]]) -> onnx.ModelProto:
    """Conv-Relu, the offending nodes turning `r` into `m`, then a Conv head and global pooling."""
    rng = np.random.default_rng(0)
    nodes, extra = middle
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            *nodes,
            helper.make_node("Conv", ["m", "head_w"], ["h"], name="head"),
            helper.make_node("GlobalAveragePool", ["h"], ["p"], name="pool"),
            helper.make_node("Flatten", ["p"], ["logits"], name="flatten"),
        ],
        "refused",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [
            constant("w1", rng.normal(size=(4, 1, 3, 3)), np.float32),
            constant("b1", rng.normal(size=4), np.float32),
            constant("head_w", rng.normal(size=(3, 4, 1, 1)), np.float32),
            constant("scale", 0.05, np.float32),
            constant("zero", 0, np.uint8),
            *extra,
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.fixture(params=sorted(OFFENDERS))
def refused(request, tmp_path):
    build, node_name = OFFENDERS[request.param]
    path = tmp_path / "model.onnx"
    onnx.save(conv_model_around(build()), str(path))
    return path, request.param, node_name


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def test_every_refused_graph_is_a_valid_onnx_model(refused):
    path, _, _ = refused
    onnx.checker.check_model(onnx.load(str(path)))


def test_purify_refuses_in_one_line_naming_the_node_and_writes_nothing(refused, tmp_path):
    path, op_type, node_name = refused
    data = random_samples(tmp_path / "data.npz", 8, SHAPE, classes=3)
    before = sorted(tmp_path.iterdir())
    result = invoke(
        "purify", path, "--data", data, "--method", "anp", "--iterations", "1", "--report", tmp_path / "report.json"
    )
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("anp-onnx: error:")
    assert f"{node_name} ({op_type})" in result.output
    assert sorted(tmp_path.iterdir()) == before, "no purified model, no report"


def test_scan_refuses_too(refused, tmp_path):
    path, op_type, _ = refused
    data = random_samples(tmp_path / "data.npz", 8, SHAPE, classes=3)
    result = invoke("scan", path, "--data", data)
    assert result.exit_code == 2 and op_type in result.output


def test_inspect_lists_the_nodes_that_cannot_be_purified(refused):
    path, op_type, node_name = refused
    listed = json.loads(invoke("inspect", path, "--json").output)["unsupported"]
    assert {"node": f"{node_name} ({op_type})", "reason": listed[0]["reason"]} in listed
    assert all(entry["node"] != "conv (Conv)" for entry in listed), "only the offending nodes are listed"
    assert "cannot purify yet:" in invoke("inspect", path).output


def test_the_refusal_says_why(tmp_path):
    for op_type, reason in (("QLinearConv", "quantized"), ("FancyActivation", "custom op domain"), ("Loop", "control")):
        path = tmp_path / f"{op_type}.onnx"
        onnx.save(conv_model_around(OFFENDERS[op_type][0]()), str(path))
        result = invoke("purify", path, "--data", tmp_path / "absent.npz")
        assert result.exit_code == 2 and reason in result.output, result.output


def test_a_supported_model_lists_nothing_unsupported(models):
    assert json.loads(invoke("inspect", models["batchnorm"], "--json").output)["unsupported"] == []


# Inputs that are not one batch of float images


def dense_head(source: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Flatten", [source], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "hidden_w"], ["hidden"], name="hidden", transB=1),
        helper.make_node("Relu", ["hidden"], ["relu"], name="relu"),
        helper.make_node("Gemm", ["relu", "head_w"], ["logits"], name="head", transB=1),
    ]


def non_image_model(kind: str) -> onnx.ModelProto:
    """Token ids through an embedding, a boolean mask cast to float, or an image with a second input."""
    rng = np.random.default_rng(0)
    tensors = [
        constant("hidden_w", rng.normal(size=(5, 36)), np.float32),
        constant("head_w", rng.normal(size=(3, 5)), np.float32),
    ]
    if kind == "token ids":
        inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["n", 9])]
        nodes = [
            helper.make_node("Gather", ["embedding", "tokens"], ["embedded"], name="embed"),
            *dense_head("embedded"),
        ]
        tensors.append(constant("embedding", rng.normal(size=(50, 4)), np.float32))
    elif kind == "boolean mask":
        inputs = [helper.make_tensor_value_info("mask", TensorProto.BOOL, ["n", 36])]
        nodes = [
            helper.make_node("Cast", ["mask"], ["as_float"], name="cast", to=TensorProto.FLOAT),
            *dense_head("as_float"),
        ]
    else:
        inputs = [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", *SHAPE]),
            helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["n", *SHAPE]),
        ]
        nodes = [helper.make_node("Mul", ["image", "weights"], ["weighted"], name="weigh"), *dense_head("weighted")]
    graph = helper.make_graph(
        nodes, kind, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], tensors
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


NON_IMAGE = {
    "token ids": ("input 'tokens' is int64", "input 'tokens'", "int64 input, not an image"),
    "boolean mask": ("input 'mask' is bool", "input 'mask'", "bool input, not an image"),
    "two inputs": ("exactly one data input, it has 2 (image, weights)", "input 'image', input 'weights'", "several"),
}


@pytest.mark.parametrize("kind", sorted(NON_IMAGE))
def test_non_image_inputs_are_refused_in_one_line_and_inspect_names_them(tmp_path, kind):
    path = tmp_path / "model.onnx"
    model = non_image_model(kind)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    data = random_samples(tmp_path / "data.npz", 8, (36,), classes=3)
    before = sorted(tmp_path.iterdir())
    message, node, reason = NON_IMAGE[kind]
    for command in ("purify", "scan", "evaluate"):
        result = invoke(command, path, "--data", data)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert message in result.output
    assert sorted(tmp_path.iterdir()) == before, "nothing written"
    listed = json.loads(invoke("inspect", path, "--json").output)["unsupported"]
    assert any(entry["node"] == node and reason in entry["reason"] for entry in listed), listed
