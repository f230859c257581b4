from pathlib import Path

import pytest
from click.testing import CliRunner

from anp_onnx.cli import main
from anp_onnx.errors import AnpError
from anp_onnx.scan import scan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_a_backdoored_example_is_flagged_with_its_true_target():
    folder = EXAMPLES / "badnets_resnet_bn"
    result = scan(folder / "model.onnx", folder / "clean.npz", rounds=2)
    assert result.suspicious and result.suspected_target == 0
    assert result.score > 0.8


def test_the_clean_control_model_is_not_flagged():
    folder = EXAMPLES / "clean_resnet_bn"
    result = scan(folder / "model.onnx", folder / "clean.npz", rounds=2)
    assert not result.suspicious
    assert result.score < 0.3


def test_scan_is_reproducible_from_the_seed(models, image_samples):
    first = scan(models["folded"], image_samples, rounds=1, seed=3)
    assert first == scan(models["folded"], image_samples, rounds=1, seed=3)
    assert sum(first.label_histogram) == round(first.error_rate * 64)


def test_scan_prints_a_verdict_and_refuses_bad_options(models, image_samples):
    result = CliRunner().invoke(main, ["scan", str(models["folded"]), "--data", str(image_samples), "--rounds", "1"])
    assert result.exit_code == 0 and "score" in result.output
    with pytest.raises(AnpError, match="rounds"):
        scan(models["folded"], image_samples, rounds=0)
