"""`anp-onnx scan` on the bundled examples (tools/make_examples.py trains them): the backdoored one is
flagged with its true target, the clean one of the same recipe is not; and on a test model, the
report's parts are consistent and reproducible."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from anp_onnx.cli.main import main
from anp_onnx.errors import AnpError
from anp_onnx.pipeline.scan import SUSPICIOUS_SCORE, TRIGGER_STEPS, scan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow  # a minute on two CPU cores; the default suite reads the same figures from purify's report below
def test_a_backdoored_example_is_flagged_with_its_true_target():
    folder = EXAMPLES / "badnets_resnet_bn"
    result = scan(folder / "model.onnx", folder / "clean.npz", rounds=2)
    true_target = json.loads((folder / "meta.json").read_text())["target"]
    assert result.suspicious and result.suspected_target == true_target == 0
    assert result.trigger_sizes[0] == min(result.trigger_sizes)
    assert result.target_share > 0.8 and result.size_ratio < 0.7
    assert result.score > SUSPICIOUS_SCORE + 0.2


@pytest.mark.slow  # minutes on two CPU cores: the default purify of a bundled example (`make test-slow`)
def test_purifys_target_search_flags_the_backdoored_example_as_scan_does(backdoored_example_purified_by_default):
    """purify's default names the target with the scan's functions, settings and seed (the bench's rescan
    test pins that the figures agree), so its report carries the scan's verdict on the BadNets example."""
    run = backdoored_example_purified_by_default
    assert run["exit_code"] == 0, run["output"]
    guided = json.loads((run["report_dir"] / "model.report.json").read_text())["guided"]
    assert (
        guided["suspected_target"] == json.loads((EXAMPLES / "badnets_resnet_bn" / "meta.json").read_text())["target"]
    )
    assert guided["label_trigger_sizes"][0] == min(guided["label_trigger_sizes"])
    assert guided["target_share"] > 0.8 and guided["size_ratio"] < 0.7
    assert guided["score"] > SUSPICIOUS_SCORE + 0.2


@pytest.mark.slow  # minutes on two CPU cores: the default scan of a bundled example (`make test-slow`)
def test_the_clean_control_model_is_not_flagged():
    folder = EXAMPLES / "clean_resnet_bn"
    result = scan(folder / "model.onnx", folder / "clean.npz", rounds=2)
    assert not result.suspicious
    assert result.score < SUSPICIOUS_SCORE - 0.1


def test_scan_is_reproducible_from_the_seed_and_reports_a_trigger_per_label(models, image_samples):
    first = scan(models["folded"], image_samples, rounds=1, trigger_steps=5, seed=3)
    assert first == scan(models["folded"], image_samples, rounds=1, trigger_steps=5, seed=3)
    assert sum(first.label_histogram) == round(first.error_rate * 64)
    assert len(first.trigger_sizes) == len(first.trigger_successes) == 4  # the test model's classes
    assert first.trigger_steps == 5 and 0 <= first.score <= 1


def test_scan_prints_a_verdict_with_progress_and_refuses_bad_options(models, image_samples):
    arguments = ["scan", str(models["folded"]), "--data", str(image_samples), "--rounds", "1", "--trigger-steps", "3"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0
    assert "score" in result.stdout and "trigger size by label" in result.stdout
    assert "trigger per label: 4/4" in result.stderr
    as_json = json.loads(CliRunner().invoke(main, [*arguments, "--json"]).stdout)
    assert as_json["trigger_steps"] == 3 and len(as_json["trigger_sizes"]) == 4
    with pytest.raises(AnpError, match="rounds"):
        scan(models["folded"], image_samples, rounds=0)
    with pytest.raises(AnpError, match="trigger-steps"):
        scan(models["folded"], image_samples, trigger_steps=0)


def test_the_command_line_default_is_the_scans():
    option = next(param for param in main.commands["scan"].params if param.name == "trigger_steps")
    assert option.default == TRIGGER_STEPS
