import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from anp_onnx.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "badnets_resnet_bn"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_purify_writes_the_model_and_a_report_that_evaluate_agrees_with(tmp_path, models, image_samples):
    model = tmp_path / "model.onnx"
    model.write_bytes(models["batchnorm"].read_bytes())
    poison = tmp_path / "poison.npz"
    data = np.load(image_samples)
    np.savez(poison, x=data["x"][:20], y=np.zeros(20, dtype=np.int64))
    report = tmp_path / "report.json"
    result = invoke(
        "purify",
        model,
        "--data",
        image_samples,
        "--test-data",
        image_samples,
        "--poison-data",
        poison,
        "--method",
        "anp",
        "--iterations",
        5,
        "--batch-size",
        16,
        "--prune-count",
        4,
        "--report",
        report,
    )
    assert result.exit_code == 0, result.output
    output = tmp_path / "model.purified.onnx"
    assert output.is_file()
    summary = json.loads(report.read_text())
    assert summary["pruned_neurons"] == 4 and len(summary["pruned"]) == 4
    assert summary["total_neurons"] == 6 + 8 + 12
    assert {"layer", "channel", "mask", "value"} <= set(summary["pruned"][0])
    assert summary["settings"]["iterations"] == 5 and summary["providers"] == ["CPUExecutionProvider"]
    assert set(summary["timings_s"]) == {"load", "import", "optimise", "rewrite", "evaluate"}
    evaluated = json.loads(
        invoke("evaluate", output, "--data", image_samples, "--poison-data", poison, "--json").output
    )
    assert (evaluated["acc"], evaluated["asr"]) == (summary["after"]["acc"], summary["after"]["asr"])
    assert "ACC" in result.output and "ASR" in result.output


def test_purify_never_modifies_its_inputs(tmp_path, models, image_samples):
    model = tmp_path / "model.onnx"
    model.write_bytes(models["folded"].read_bytes())
    before = digest(model), digest(image_samples)
    result = invoke("purify", model, "--data", image_samples, "--method", "anp", "--iterations", 3, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert (digest(model), digest(image_samples)) == before


def purify_with_report(tmp_path: Path, model: Path, data: Path, *options: object) -> dict:
    """Run `purify` quickly into tmp_path and return its JSON report."""
    report = tmp_path / "r.json"
    short_run = ("--method", "anp", "--iterations", 3, "--batch-size", 8)
    result = invoke(
        "purify", model, "--data", data, "-o", tmp_path / "o.onnx", *short_run, *options, "--report", report
    )
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text())


def test_without_test_data_the_report_holds_nulls(tmp_path, models, image_samples):
    summary = purify_with_report(tmp_path, models["folded"], image_samples)
    assert summary["before"]["acc"] is None and summary["after"]["asr"] is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["purify", "missing.onnx", "--data", "{data}"], "missing.onnx: no such file"),
        (["purify", "{model}", "--data", "nothing.npz", "-o", "{tmp}/o.onnx"], "--data nothing.npz: no such file"),
        (["purify", "{model}", "--data", "{data}", "-o", "{model}"], "is the input model"),
        (["purify", "{model}", "--data", "{data}", "--threshold", "0.1", "--prune-count", "3"], "choose one of"),
        (["evaluate", "{model}", "--data", "{vectors}"], "do not fit the model input"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_two(
    tmp_path, models, image_samples, vector_samples, arguments, message
):
    fill = {"data": image_samples, "model": models["folded"], "tmp": tmp_path, "vectors": vector_samples}
    result = CliRunner().invoke(main, [argument.format(**fill) for argument in arguments])
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_an_existing_output_is_kept_without_force(tmp_path, models, image_samples):
    output = tmp_path / "out.onnx"
    output.write_bytes(b"previous")
    result = CliRunner().invoke(
        main, ["purify", str(models["folded"]), "--data", str(image_samples), "-o", str(output)]
    )
    assert result.exit_code == 2 and "--force" in result.output
    assert output.read_bytes() == b"previous"


def test_inspect_lists_prunable_layers_and_the_head(models):
    description = json.loads(invoke("inspect", models["batchnorm"], "--json").output)
    assert [layer["op_type"] for layer in description["layers"]] == ["BatchNormalization"] * 2 + ["Gemm"]
    assert description["total_neurons"] == 26
    assert description["inputs"][0]["shape"] == ["batch", 1, 16, 16]
    assert "classifier head" in description["not_pruned"][0]["reason"]


def test_the_console_script_runs_as_a_real_process(models):
    completed = subprocess.run(
        [sys.executable, "-m", "anp_onnx.cli", "inspect", str(models["folded"])],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr
    assert "prunable layers: 3, neurons: 26" in completed.stdout


@pytest.mark.skipif(not (EXAMPLE / "model.onnx").is_file(), reason="bundled example not generated yet")
def test_the_bundled_backdoored_example_is_backdoored_and_purify_runs_on_it(tmp_path):
    report = tmp_path / "report.json"
    result = invoke(
        "purify",
        EXAMPLE / "model.onnx",
        "--data",
        EXAMPLE / "clean.npz",
        "--test-data",
        EXAMPLE / "test.npz",
        "--poison-data",
        EXAMPLE / "poison.npz",
        "-o",
        tmp_path / "out.onnx",
        "--report",
        report,
        "--method",
        "anp",
        "--iterations",
        20,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(report.read_text())
    assert summary["before"]["asr"] > 0.9 and summary["before"]["acc"] > 0.85


def test_max_acc_drop_chooses_the_amount_on_held_out_clean_data(tmp_path, models, image_samples):
    summary = purify_with_report(tmp_path, models["batchnorm"], image_samples, "--max-acc-drop", 0.05)
    assert summary["criterion"] == "max-acc-drop=0.05"
    assert summary["settings"]["holdout"] == 0.2


def test_labels_outside_the_model_classes_are_refused(tmp_path, models, image_samples):
    data = np.load(image_samples)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=data["x"][:8], y=np.full(8, 7))
    result = CliRunner().invoke(
        main,
        [
            "purify",
            str(models["folded"]),
            "--data",
            str(image_samples),
            "--test-data",
            str(bad),
            "-o",
            str(tmp_path / "o.onnx"),
        ],
    )
    assert result.exit_code == 2
    assert "--test-data: labels must lie in 0..3 (the model has 4 classes)" in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_a_model_without_a_float_input_is_refused(tmp_path, image_samples):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["tokens"], ["logits"], to=TensorProto.FLOAT)],
        "tokens",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["n", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
    )
    path = tmp_path / "tokens.onnx"
    path.write_bytes(
        helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    result = CliRunner().invoke(main, ["evaluate", str(path), "--data", str(image_samples)])
    assert result.exit_code == 2 and "input 'tokens' is int64" in result.output
