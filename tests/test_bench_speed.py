"""tools/bench_speed.py runs end to end on the bundled example and reports consistent numbers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.bench_speed import main  # noqa: E402

EXAMPLE = ROOT / "examples" / "badnets_resnet_bn"


QUICK = ["--example", str(EXAMPLE), "--steps", "2", "--batch-size", "16", "--warmup", "1"]


def run_bench(tmp_path: Path, *options: str) -> tuple[str, dict]:
    output = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [*QUICK, *options, "--json", str(output)])
    assert result.exit_code == 0, result.output
    return result.output, json.loads(output.read_text())


def test_bench_speed_reports_five_timings_and_their_ratios(tmp_path: Path) -> None:
    output, report = run_bench(tmp_path, "--no-end-to-end")
    assert "b/a" in output and "evaluator/bare" in output and "(f) trigger step" in output
    measurements, ratios = report["measurements"], report["ratios"]
    assert set(measurements) == {"train_step", "anp_iteration", "reference_iteration", "evaluation", "trigger_step"}
    medians = {key: measurements[key]["median_s"] for key in ("train_step", "anp_iteration", "reference_iteration")}
    for key, median in medians.items():
        assert median > 0, key
        assert len(measurements[key]["samples_s"]) == 2
    evaluation = measurements["evaluation"]
    for key in ("evaluator_samples_per_s", "bare_samples_per_s", "evaluator_median_s", "bare_median_s"):
        assert evaluation[key] > 0, key
    assert math.isclose(evaluation["evaluator_samples_per_s"] * evaluation["evaluator_median_s"], evaluation["samples"])

    assert math.isclose(ratios["anp_over_train"], medians["anp_iteration"] / medians["train_step"])
    assert math.isclose(ratios["reference_over_train"], medians["reference_iteration"] / medians["train_step"])
    assert math.isclose(ratios["anp_over_reference"], medians["anp_iteration"] / medians["reference_iteration"])
    assert math.isclose(
        ratios["evaluator_over_bare_throughput"],
        evaluation["evaluator_samples_per_s"] / evaluation["bare_samples_per_s"],
    )
    trigger = measurements["trigger_step"]
    assert len(trigger["fast_samples_s"]) == len(trigger["plain_samples_s"]) == 2
    assert math.isclose(ratios["trigger_fast_over_plain"], trigger["fast_median_s"] / trigger["plain_median_s"])
    assert report["machine"]["precision"] in ("bfloat16", "float32")
    assert "purify_over_reference_2000" not in ratios
    assert report["machine"]["cpu_count"] >= 1
    assert report["machine"]["torch_device"] in ("cpu", "cuda")
    assert report["settings"]["anp_neurons"] == report["settings"]["reference_neurons"] > 0


@pytest.mark.slow  # the whole default purify (minutes on two CPU cores)
def test_bench_speed_times_default_purify_end_to_end_against_2000_reference_iterations(tmp_path: Path) -> None:
    _, report = run_bench(tmp_path)
    measurements, ratios = report["measurements"], report["ratios"]
    end_to_end = measurements["purify_end_to_end"]
    assert end_to_end["method"] == "trigger" and end_to_end["seconds"] > sum(end_to_end["timings_s"].values()) * 0.99
    assert math.isclose(end_to_end["reference_2000_s"], 2000 * measurements["reference_iteration"]["median_s"])
    assert math.isclose(ratios["purify_over_reference_2000"], end_to_end["seconds"] / end_to_end["reference_2000_s"])
    assert end_to_end["after"]["asr"] < end_to_end["before"]["asr"]
