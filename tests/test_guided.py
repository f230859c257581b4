"""Trigger-guided pruning (purify's default method) on the bundled backdoored examples, which
tools/make_examples.py trains: the perturbation and the triggers' sizes name the target, the trigger
synthesised for it reaches the target with a small mask, a blended-in backdoor shows in a blend
trigger's opacity, and pruning against the triggers removes the real backdoor."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from anp_onnx.cli.main import main
from anp_onnx.methods.trigger.guided import ANOMALOUS_BLEND, BLEND_STEPS, smallest_reaching, typical_label
from anp_onnx.methods.trigger.pruning import TriggerPruningSettings, prune_against_trigger
from anp_onnx.methods.trigger.synthesis import Trigger, TriggerSettings, hit_rate, synthesise_trigger
from anp_onnx.methods.trigger.target import TargetSearch, perturbation_errors, suspected_target, weigh_evidence
from anp_onnx.pipeline.purify import purify

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BACKDOORED = EXAMPLES / "badnets_resnet_bn"  # BadNets patch, target 0
CLEAN = EXAMPLES / "clean_resnet_bn"  # the same recipe without poisoning
QUICK_TRIGGER = TriggerSettings(steps=150)


@pytest.fixture(scope="module")
def backdoored(calibrated_example):
    return calibrated_example(BACKDOORED.name)


def test_the_perturbations_errors_name_the_attackers_target(backdoored):
    histogram, errors = perturbation_errors(*backdoored, eps=0.4, rounds=2, seed=0)
    target, share = suspected_target(histogram)
    assert target == json.loads((BACKDOORED / "meta.json").read_text())["target"] == 0
    assert share > 0.8 and errors == histogram.sum()


def test_the_backdoor_target_is_reached_with_a_smaller_trigger_than_another_label(backdoored):
    to_target = synthesise_trigger(*backdoored, target=0, settings=QUICK_TRIGGER)
    to_other = synthesise_trigger(*backdoored, target=4, settings=QUICK_TRIGGER)
    assert to_target.success > 0.95
    assert to_target.size < 0.5 * to_other.size
    assert smallest_reaching([to_other, to_target]) is to_target


def test_of_the_candidates_triggers_the_smallest_that_reaches_its_label_names_the_target():
    reaching, tiny_but_failed, larger = _patch(2, 30.0, 0.99), _patch(6, 5.0, 0.2), _patch(8, 40.0, 0.97)
    assert smallest_reaching([larger, tiny_but_failed, reaching]) is reaching
    assert smallest_reaching([_patch(1, 9.0, 0.1), _patch(3, 7.0, 0.3)]).target == 3


def test_the_typical_label_is_the_median_of_the_labels_other_than_the_target():
    sizes = [40.0, 90.0, 70.0, 80.0, 120.0, 60.0]
    triggers = [_patch(label, size) for label, size in enumerate(sizes)]
    histogram = np.zeros(6, dtype=np.int64)
    smallest_named = TargetSearch(weigh_evidence(histogram, sizes), histogram, 0, triggers, 0.0)
    assert smallest_named.evidence.label == 0 and typical_label(smallest_named) == 3  # 60 70 [80] 90 120
    median_named = smallest_named.naming(3)  # a dominant share can name a label of median size
    assert typical_label(median_named) == 2  # 40 60 [70] 90 120


def _patch(label: int, size: float, success: float = 1.0) -> Trigger:
    return Trigger("patch", label, torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), success, size)


@pytest.mark.slow  # 89 s on two CPU cores (two 200-step blends on the VGG); make bench's Blend cells run the gate
def test_a_blend_trigger_stands_out_where_the_backdoor_is_blended_in(calibrated_example):
    """The gate that decides whether purify prunes against the blend: the target's opacity against
    another label's (purify takes the label of median patch size). On the BadNets model the gate stays
    shut: `test_purify_by_default_removes_the_bundled_backdoor_within_three_points_of_accuracy`."""
    classifier, x, y = calibrated_example("blend_vgg_bn")
    settings = TriggerSettings("blend", steps=BLEND_STEPS)
    blend = synthesise_trigger(classifier, x, y, 0, settings)
    reference = synthesise_trigger(classifier, x, y, 4, settings)
    assert blend.success > 0.95 and reference.success > 0.95
    assert blend.size <= ANOMALOUS_BLEND * reference.size


def test_pruning_against_the_trigger_keeps_each_round_within_the_clean_accuracy_budget(calibrated_example):
    classifier, x, y = calibrated_example(BACKDOORED.name)  # its own: pruning leaves the masks hard
    trigger = synthesise_trigger(classifier, x, y, target=0, settings=QUICK_TRIGGER)
    settings = TriggerPruningSettings(max_acc_drop=0.01, candidates=8)
    result = prune_against_trigger(classifier, x, y, trigger, settings)
    assert result.synthetic_asr_before > 0.95
    assert all(step.clean_accuracy >= result.clean_accuracy_before - 0.01 for step in result.rounds)
    assert "clean accuracy" in result.stopped_because or "synthetic ASR" in result.stopped_because
    pruned = {(neuron.layer, neuron.channel) for neuron in result.plan.neurons}
    masks_off = {
        (layer.name, channel)
        for layer, gate in zip(classifier.neuron_map.layers, classifier.gates, strict=True)
        for channel in torch.nonzero(gate.mask == 0).flatten().tolist()
    }
    assert pruned == masks_off and len(pruned) == len(result.rounds)
    assert hit_rate(classifier, trigger.stamp(x[y != 0]), torch.zeros(int((y != 0).sum()))) == pytest.approx(
        result.rounds[-1].synthetic_asr if result.rounds else result.synthetic_asr_before, abs=1e-4
    )


@pytest.mark.slow  # minutes on two CPU cores: the default purify of a bundled example (`make test-slow`)
def test_purify_by_default_removes_the_bundled_backdoor_within_three_points_of_accuracy(
    backdoored_example_purified_by_default,
):
    run = backdoored_example_purified_by_default
    assert run["exit_code"] == 0, run["output"]
    report = json.loads((run["report_dir"] / "model.report.json").read_text())
    guided = report["guided"]
    assert report["settings"]["method"] == "trigger" and guided["suspected_target"] == 0
    assert [trigger["kind"] for trigger in guided["triggers"]] == ["patch"]  # a patch backdoor: no blend
    assert report["before"]["asr"] > 0.99 and report["after"]["asr"] <= 0.10
    assert report["before"]["acc"] - report["after"]["acc"] <= 0.03
    assert report["verdict"]["name"] == "purified"
    repair = report["repair"]
    if repair["ran"]:  # repair replaced the pruning: only initializer values changed, each by a bounded amount
        assert report["pruned_neurons"] == 0 and report["criterion"].startswith("repair:")
        assert repair["changed_initializers"] and all(
            0 < c["relative_change"] < 1 for c in repair["changed_initializers"]
        )
        assert repair["residual_asr"] <= 0.03
    else:
        assert 0 < report["pruned_neurons"] <= 10


@pytest.mark.slow  # minutes on two CPU cores: the whole default on a second model
def test_purify_by_default_leaves_a_clean_model_almost_as_it_was(tmp_path):
    result = purify(CLEAN / "model.onnx", CLEAN / "clean.npz", tmp_path / "out.onnx", test_data=CLEAN / "test.npz")
    assert len(result.plan.neurons) <= 3
    assert result.before.acc - result.after.acc <= 0.01


def test_mask_rankings_are_refused_with_the_trigger_method(tmp_path):
    model, data = BACKDOORED / "model.onnx", BACKDOORED / "clean.npz"
    for option in (["--threshold", "0.3"], ["--prune-count", "3"], ["--prune-fraction", "0.1"]):
        result = CliRunner().invoke(
            main, ["purify", str(model), "--data", str(data), "-o", str(tmp_path / "o.onnx"), *option]
        )
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert "is not used by --method trigger" in result.output and "use it with --method anp" in result.output
    assert not (tmp_path / "o.onnx").exists()
