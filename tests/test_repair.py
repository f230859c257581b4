"""The repair stage and the verdict: repaired models keep their graph, a live backdoor is never called
purified (exit code 3), and a model without backdoor evidence is written as it came."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from anp_onnx.cli.main import main
from anp_onnx.pipeline.verdict import RESIDUAL_EXIT_CODE, judge

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def graph_skeleton(model: onnx.ModelProto) -> tuple:
    """Everything of a model but its initializer values."""
    nodes = [(node.op_type, tuple(node.input), tuple(node.output), str(node.attribute)) for node in model.graph.node]
    initializers = [(tensor.name, tuple(tensor.dims), tensor.data_type) for tensor in model.graph.initializer]
    inputs, outputs = (str(model.graph.input), str(model.graph.output))
    return nodes, initializers, inputs, outputs, [(o.domain, o.version) for o in model.opset_import]


@pytest.mark.slow  # minutes on two CPU cores: the default purify of a bundled example (`make test-slow`)
def test_repair_changes_initializer_values_only_and_reports_each_change(backdoored_example_purified_by_default):
    run = backdoored_example_purified_by_default
    report = json.loads((run["report_dir"] / "model.report.json").read_text())
    if not report["repair"]["ran"]:
        pytest.skip("pruning removed the bundled backdoor alone: nothing repaired to check")
    given = onnx.load(str(EXAMPLES / "badnets_resnet_bn" / "model.onnx"))
    written = onnx.load(str(run["out_dir"] / "model.onnx"))
    assert graph_skeleton(written) == graph_skeleton(given)
    old = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in given.graph.initializer}
    new = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in written.graph.initializer}
    changed = {name for name in old if not np.array_equal(old[name], new[name])}
    reported = {entry["name"]: entry["relative_change"] for entry in report["repair"]["changed_initializers"]}
    assert changed == set(reported)
    for name in changed:
        relative = np.linalg.norm(new[name] - old[name]) / np.linalg.norm(old[name])
        assert relative == pytest.approx(reported[name], rel=1e-3, abs=1e-6)


def purify_example(name: str, folder: Path, *options: str) -> tuple[object, dict]:
    example = EXAMPLES / name
    arguments = ["purify", example / "model.onnx", "--data", example / "clean.npz"]
    arguments += ["--test-data", example / "test.npz", "--poison-data", example / "poison.npz"]
    arguments += ["-o", folder / "out.onnx", "--report", folder / "report.json", *options]
    result = CliRunner().invoke(main, [str(argument) for argument in arguments])
    assert (folder / "report.json").is_file(), (result.output, result.exception)
    return result, json.loads((folder / "report.json").read_text())


@pytest.mark.slow  # minutes on two CPU cores: the default purify of a bundled example (`make test-slow`)
def test_a_backdoor_pruning_leaves_live_is_residual_exit_code_three(tmp_path):
    result, report = purify_example("badnets_resnet_bn", tmp_path, "--repair", "never")
    assert result.exit_code == RESIDUAL_EXIT_CODE, result.output
    assert report["verdict"]["name"] == "residual" and not report["repair"]["ran"]
    assert report["repair"]["residual_asr"] > 0.03
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("verdict: RESIDUAL") and "do not ship it" in last and "--repair always" in last


@pytest.mark.slow  # minutes on two CPU cores: the default purify of a bundled example (`make test-slow`)
def test_a_clean_model_is_called_clean_and_written_unchanged(tmp_path):
    result, report = purify_example("clean_resnet_bn", tmp_path)
    assert result.exit_code == 0, result.output
    assert report["verdict"]["name"] == "clean" and report["guided"]["backdoor_evidence"] is False
    assert report["pruned_neurons"] == 0 and not report["repair"]["ran"]
    assert report["after"]["acc"] == report["before"]["acc"]
    assert result.output.strip().splitlines()[-1].startswith("verdict: clean")


def test_repair_is_refused_with_the_anp_method(tmp_path):
    example = EXAMPLES / "badnets_resnet_bn"
    arguments = ["purify", str(example / "model.onnx"), "--data", str(example / "clean.npz"), "--method", "anp"]
    result = CliRunner().invoke(main, [*arguments, "--repair", "always", "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and "--repair is not used by --method anp" in result.output
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("measured", "verdict"),
    [
        ({"evidence": False, "synthesis_failed": False, "residual_asr": None}, "clean"),
        ({"evidence": True, "synthesis_failed": False, "residual_asr": 0.02}, "purified"),
        ({"evidence": True, "synthesis_failed": False, "residual_asr": 0.031}, "residual"),
        ({"evidence": True, "synthesis_failed": False, "residual_asr": None}, "residual"),
        ({"evidence": False, "synthesis_failed": True, "residual_asr": None}, "residual"),  # nothing measured
    ],
)
def test_the_verdict_follows_what_was_measured(measured, verdict):
    assert judge(**measured, stop_level=0.03, target=0).name == verdict
