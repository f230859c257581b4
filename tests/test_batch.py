"""`anp-onnx batch` on the bundled example models: isolation, resume, policy, reports, interrupts."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import default_sigint
from matplotlib.image import imread
from onnx import TensorProto, helper, numpy_helper

from anp_onnx.cli.main import main
from anp_onnx.data import load_samples
from anp_onnx.validate.evaluate import Evaluator

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GOOD_MODELS = {"badnets": "badnets_resnet_bn", "blend": "blend_vgg_bn", "clean": "clean_resnet_bn"}
SHORT = ("--method", "anp", "--iterations", "10", "--batch-size", "16")

pytestmark = pytest.mark.skipif(
    not all((EXAMPLES / folder / "model.onnx").is_file() for folder in GOOD_MODELS.values()),
    reason="bundled examples not generated",
)


def invoke(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def comparable(summary: dict) -> list[dict]:
    """What must not change between runs of the same batch: per model, the result and its figures."""
    keys = ("name", "before", "after", "pruned_neurons", "total_neurons", "violations")
    return [
        {**{key: model[key] for key in keys}, "done": model["status"] in ("purified", "skipped")}
        for model in summary["models"]
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Small subsets of the BadNets example's data: a fast batch with meaningful figures."""
    folder = tmp_path_factory.mktemp("data")
    sizes = {"clean": 64, "test": 100, "poison": 100}
    paths = {}
    for name, count in sizes.items():
        with np.load(EXAMPLES / "badnets_resnet_bn" / f"{name}.npz") as archive:
            paths[name] = folder / f"{name}.npz"
            np.savez(paths[name], x=archive["x"][:count], y=archive["y"][:count])
    return paths


def data_options(data: dict[str, Path]) -> tuple[object, ...]:
    return ("--data", data["clean"], "--test-data", data["test"], "--poison-data", data["poison"], *SHORT)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Three good models and one corrupt file in one folder."""
    folder = tmp_path_factory.mktemp("models")
    for name, example in GOOD_MODELS.items():
        shutil.copyfile(EXAMPLES / example / "model.onnx", folder / f"{name}.onnx")
    (folder / "corrupt.onnx").write_bytes(b"\x08\x07" + bytes(range(256)) * 8)
    return folder


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, models, data):
    """The batch run once, with a report folder; tests copy its folders before changing anything."""
    root = tmp_path_factory.mktemp("first")
    result = invoke("batch", models, "--out-dir", root / "out", "--report-dir", root / "reports", *data_options(data))
    return result, root / "out", root / "reports"


def copy_run(first_run, tmp_path: Path) -> tuple[Path, Path]:
    _, out_dir, report_dir = first_run
    shutil.copytree(out_dir, tmp_path / "out")
    shutil.copytree(report_dir, tmp_path / "reports")
    return tmp_path / "out", tmp_path / "reports"


def test_three_good_models_are_purified_and_the_corrupt_one_fails_with_exit_code_one(first_run, data):
    result, out_dir, _ = first_run
    assert result.exit_code == 1, result.output
    summary = json.loads((out_dir / "summary.json").read_text())
    statuses = {model["name"]: model["status"] for model in summary["models"]}
    assert statuses == {"badnets": "purified", "blend": "purified", "clean": "purified", "corrupt": "failed"}
    counts = {"purified": 3, "residual": 0, "skipped": 0, "failed": 1, "refused": 0, "policy_violations": 0}
    assert summary["counts"] == counts
    corrupt = summary["models"][-1]
    assert "not a readable ONNX model" in corrupt["reason"] and corrupt["after"] is None
    assert "[4/4] corrupt: failed" in result.output
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "badnets.onnx",
        "blend.onnx",
        "clean.onnx",
        "summary.json",
        "summary.md",
    ]
    test = load_samples(data["test"], (None, 1, 28, 28), "--test-data")
    for model in summary["models"][:3]:
        written = Path(model["output"])
        assert written.parent == out_dir
        onnx.checker.check_model(onnx.load(str(written)))
        assert Evaluator(written, "cpu").accuracy(test) == model["after"]["acc"]  # the figures are the file's
        report = json.loads(Path(model["report"]).read_text())
        assert report["after"] == model["after"] and report["batch"]["name"] == model["name"]
    markdown = (out_dir / "summary.md").read_text()
    assert "| badnets | purified |" in markdown and "| corrupt | failed |" in markdown


def test_a_rerun_optimises_nothing_says_skipped_and_gives_the_same_summary(first_run, models, data, tmp_path):
    out_dir, report_dir = copy_run(first_run, tmp_path)
    before = {path.name: path.read_bytes() for folder in (out_dir, report_dir) for path in folder.glob("*.*")}
    result = invoke("batch", models, "--out-dir", out_dir, "--report-dir", report_dir, *data_options(data))
    assert result.exit_code == 1
    assert result.output.count(": skipped,") == 3 and "(up to date)" in result.output
    rerun = json.loads((out_dir / "summary.json").read_text())
    first = json.loads((first_run[1] / "summary.json").read_text())
    assert comparable(rerun) == comparable(first)
    assert [model["status"] for model in rerun["models"]] == ["skipped"] * 3 + ["failed"]
    for name in ("badnets.onnx", "blend.onnx", "clean.onnx", "badnets.report.json", "clean.sweep.png"):
        assert (out_dir / name if name.endswith(".onnx") else report_dir / name).read_bytes() == before[name]


def test_force_redoes_a_finished_model_with_the_same_result(first_run, models, data, tmp_path):
    out_dir, report_dir = copy_run(first_run, tmp_path)
    report = report_dir / "clean.report.json"
    old_report = json.loads(report.read_text())
    arguments = ("batch", models / "clean.onnx", "--out-dir", out_dir, "--report-dir", report_dir, *data_options(data))
    result = invoke(*arguments, "--force")
    assert result.exit_code == 0, result.output
    assert "[1/1] clean: purified" in result.output
    new_report = json.loads(report.read_text())
    assert new_report["timings_s"] != old_report["timings_s"]  # really run again
    assert (new_report["after"], new_report["pruned"]) == (old_report["after"], old_report["pruned"])


def test_changed_settings_or_a_changed_output_are_redone_the_rest_skipped(first_run, models, data, tmp_path):
    out_dir, report_dir = copy_run(first_run, tmp_path)
    (out_dir / "blend.onnx").write_bytes(b"replaced by someone")
    manifest = tmp_path / "batch.json"
    manifest.write_text(
        json.dumps(
            {
                "defaults": {"data": str(data["clean"]), "test_data": str(data["test"])},
                "models": [
                    {"model": str(models / "badnets.onnx"), "poison_data": str(data["poison"])},
                    {"model": str(models / "blend.onnx"), "poison_data": str(data["poison"])},
                    {"model": str(models / "clean.onnx"), "poison_data": str(data["poison"]), "iterations": 11},
                ],
            }
        )
    )
    result = invoke("batch", "--manifest", manifest, "--out-dir", out_dir, "--report-dir", report_dir, *SHORT)
    assert result.exit_code == 0, result.output
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [model["status"] for model in summary["models"]] == ["skipped", "purified", "purified"]
    clean_report = json.loads((report_dir / "clean.report.json").read_text())
    assert clean_report["settings"]["iterations"] == 11
    onnx.checker.check_model(onnx.load(str(out_dir / "blend.onnx")))


def test_the_policy_decides_the_exit_code(first_run, models, data, tmp_path):
    out_dir, report_dir = copy_run(first_run, tmp_path)
    good = [models / f"{name}.onnx" for name in GOOD_MODELS]
    first = json.loads((first_run[1] / "summary.json").read_text())["models"][:3]
    worst_asr = max(model["after"]["asr"] for model in first)
    worst_drop = max(model["before"]["acc"] - model["after"]["acc"] for model in first)
    common = ("batch", *good, "--out-dir", out_dir, "--report-dir", report_dir, *data_options(data))

    within = invoke(*common, "--max-asr", worst_asr, "--max-acc-drop", max(worst_drop, 0))
    assert within.exit_code == 0, within.output

    broken = invoke(*common, "--max-asr", worst_asr - 0.01)
    assert broken.exit_code == 1
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["counts"]["policy_violations"] >= 1
    offender = next(model for model in summary["models"] if model["violations"])
    assert offender["after"]["asr"] == worst_asr and "ASR" in offender["violations"][0]
    assert offender["within_policy"] is False and offender["status"] == "skipped"


def test_the_report_folder_has_plots_a_sweep_that_matches_the_written_model_and_a_page(first_run):
    _, _, report_dir = first_run
    page = (report_dir / "index.html").read_text()
    for name in GOOD_MODELS:
        report = json.loads((report_dir / f"{name}.report.json").read_text())
        at_chosen = next(point for point in report["sweep"] if point["threshold"] == 0.2)
        assert (at_chosen["acc"], at_chosen["asr"]) == (report["after"]["acc"], report["after"]["asr"])
        assert at_chosen["pruned"] == report["pruned_neurons"]
        assert [point["threshold"] for point in report["sweep"]] == [round(0.1 * step, 1) for step in range(10)]
        for kind in ("masks", "sweep"):
            image = imread(report_dir / f"{name}.{kind}.png")
            assert image.shape[:2] == (440, 640)
            assert f'src="{name}.{kind}.png"' in page
        assert f'href="{name}.report.json"' in page
    assert "corrupt" in page and "not a readable ONNX model" in page
    assert not list(report_dir.glob(".*"))


def test_a_model_that_cannot_be_purified_is_refused_and_nothing_is_written(tmp_path, data):
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
        ],
        "head_only",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [
            numpy_helper.from_array(rng.normal(size=(10, 784)).astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(10, np.float32), "b"),
        ],
    )
    model = tmp_path / "head_only.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    result = invoke("batch", model, "--out-dir", tmp_path / "out", "--data", data["clean"], *SHORT)
    assert result.exit_code == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["models"][0]["status"] == "refused"
    assert "no prunable layers" in summary["models"][0]["reason"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["summary.json", "summary.md"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{models}/missing.onnx", "--data", "{clean}"], "no such file or folder"),
        (["{models}/badnets.onnx"], "no clean data"),
        (["{models}", "--data", "{clean}", "--test-data", "nothing.npz"], "test_data nothing.npz: no such file"),
        (["{models}", "--data", "{clean}", "--max-acc-drop", "0.02"], "--max-acc-drop needs test data"),
        (["{models}/badnets.onnx", "--data", "{clean}", "--threshold", "0.1", "--prune-count", "3"], "choose one"),
        (["--manifest", "{manifest}", "--data", "{clean}"], "unknown keys iteration"),
        (["{models}", "--data", "{clean}", "--executor", "dask"], "'dask' is not one of"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_two(tmp_path, models, data, arguments, message):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"model": str(models / "clean.onnx"), "iteration": 5}]))
    fill = {"models": models, "clean": data["clean"], "manifest": manifest}
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(main, ["batch", *(a.format(**fill) for a in arguments), "--out-dir", str(out_dir)])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert not out_dir.exists()


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    """The child's stdout lines up to the first that contains `text`; fails (and kills the child) when
    none has come within `timeout` seconds, so a child that never prints it cannot hang the suite."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        try:
            for line in process.stdout:
                lines.put(line)
        except (ValueError, OSError):  # stdout closed by communicate() later
            pass

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            process.kill()
            raise AssertionError(f"no {text!r} within {timeout:g} s; stdout so far: {seen}") from None
        seen.append(line)
        if text in line:
            return seen


def write_manifest(path: Path, data: dict[str, Path], *entries: dict[str, object]) -> Path:
    path.write_text(json.dumps({"defaults": {"data": str(data["clean"])}, "models": list(entries)}))
    return path


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_batch_leaves_whole_files_only_and_the_rerun_completes_the_rest(
    tmp_path, models, data, signal_number
):
    out_dir = tmp_path / "out"
    first = {"model": str(models / "clean.onnx")}
    second = {"model": str(models / "badnets.onnx")}
    endless = {**second, "iterations": 100_000, "early_stop": False}  # runs until it is interrupted
    short = ["--out-dir", str(out_dir), "--method", "anp", "--iterations", "5", "--batch-size", "16"]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "anp_onnx.cli.main",
            "batch",
            "--manifest",
            write_manifest(tmp_path / "a.json", data, first, endless),
            *short,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=default_sigint,
    )
    wait_for_line(process, "[1/2] clean: purified")
    process.send_signal(signal_number)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130, error
    assert "interrupted" in error and "Traceback" not in error
    assert sorted(path.name for path in out_dir.iterdir()) == ["clean.onnx", "clean.report.json"]

    rerun = invoke("batch", "--manifest", write_manifest(tmp_path / "b.json", data, first, second), *short)
    assert rerun.exit_code == 0, rerun.output
    assert "clean: skipped" in rerun.output and "badnets: purified" in rerun.output
    names = sorted(path.name for path in out_dir.iterdir())
    assert names == [
        "badnets.onnx",
        "badnets.report.json",
        "clean.onnx",
        "clean.report.json",
        "summary.json",
        "summary.md",
    ]


def test_the_ray_executor_gives_the_same_summary(first_run, models, data, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, logging_level="warning")
    try:
        result = invoke("batch", models, "--out-dir", tmp_path / "out", "--executor", "ray", *data_options(data))
    finally:
        ray.shutdown()
    assert result.exit_code == 1, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    first = json.loads((first_run[1] / "summary.json").read_text())
    assert summary["executor"] == "ray"
    assert comparable(summary) == comparable(first)
    assert [model["status"] for model in summary["models"]] == ["purified"] * 3 + ["failed"]


@pytest.mark.parametrize(
    "default_run",
    [
        "tiny_backdoor_purified_by_default",  # seconds: no evidence found on it, so no rounds
        pytest.param("backdoored_example_purified_by_default", marks=pytest.mark.slow),  # minutes, pruning rounds
    ],
)
def test_the_default_method_reports_the_synthetic_trigger_and_each_pruning_round(default_run, request):
    """`--method trigger` (the default): the trigger as a picture, and ACC / ASR of every prefix of the
    plan, the last of which is the written model."""
    run = request.getfixturevalue(default_run)
    assert run["exit_code"] == 0, run["output"]
    report_dir = run["report_dir"]
    report = json.loads((report_dir / "model.report.json").read_text())
    assert report["settings"]["method"] == "trigger" and report["guided"]["triggers"][0]["kind"] == "patch"
    sweep, rounds = report["sweep"], report["guided"]["rounds"]
    assert [point["pruned"] for point in sweep] == list(range(len(rounds) + 1))  # the method's pruning
    assert (sweep[0]["acc"], sweep[0]["asr"]) == (report["before"]["acc"], report["before"]["asr"])
    if not report["repair"]["ran"]:  # the written model is the last prefix
        assert (sweep[-1]["acc"], sweep[-1]["asr"]) == (report["after"]["acc"], report["after"]["asr"])
    page = (report_dir / "index.html").read_text()
    for kind, size in (("trigger", (360, 960)), ("rounds", (440, 640)), ("repair", (440, 640))):
        assert imread(report_dir / f"model.{kind}.png").shape[:2] == size
        assert f'src="model.{kind}.png"' in page
    assert not (report_dir / "model.masks.png").exists()
