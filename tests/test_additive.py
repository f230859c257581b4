"""The universal additive trigger (`methods/trigger/additive.py`), the evidence it gives, and purify on a
SIG backdoor (a clean-label attack that adds a faint sinusoid over the whole image), on the bundled
examples that tools/make_examples.py trains."""

import json
from pathlib import Path

import pytest

from anp_onnx.methods.trigger.additive import DEFAULT_BOUND, synthesise_additive
from anp_onnx.methods.trigger.evidence import ADDITIVE_SUCCESS, BackdoorEvidence
from anp_onnx.pipeline.purify import purify

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SIG = EXAMPLES / "sig_resnet_bn"  # SIG, target 0, 5% of the target's images poisoned
SIG_TYPICAL_LABEL = 4  # the label of median patch size, which purify compares the target with


def test_an_additive_trigger_stays_within_its_bound_and_the_clean_data_range(calibrated_example):
    classifier, x, y = calibrated_example("clean_resnet_bn")
    trigger = synthesise_additive(classifier, x, y, 6, steps=5)
    stamped = trigger.stamp(x)
    span = x.amax() - x.amin()
    assert trigger.kind == "additive" and trigger.size == DEFAULT_BOUND
    assert float((stamped - x).abs().max()) <= DEFAULT_BOUND * float(span) + 1e-6
    assert float((stamped - x).abs().max()) > 0.5 * DEFAULT_BOUND * float(span)  # it moved
    assert float(stamped.min()) >= float(x.min()) and float(stamped.max()) <= float(x.max())
    assert 0.0 <= trigger.success <= 1.0


def test_a_sig_backdoors_target_is_reached_by_a_faint_additive_trigger_where_a_typical_label_is_not(
    calibrated_example,
):
    classifier, x, y = calibrated_example(SIG.name)
    assert json.loads((SIG / "meta.json").read_text())["target"] == 0
    target, typical = (synthesise_additive(classifier, x, y, label) for label in (0, SIG_TYPICAL_LABEL))
    assert target.success >= ADDITIVE_SUCCESS > typical.success
    assert BackdoorEvidence(0.4, 0.46, target.success, typical.success).found  # neither other signal fires


def test_no_label_of_the_clean_example_is_reached_at_the_evidence_level(calibrated_example):
    classifier, x, y = calibrated_example("clean_resnet_bn")
    successes = [synthesise_additive(classifier, x, y, label).success for label in range(10)]
    assert max(successes) < ADDITIVE_SUCCESS


@pytest.mark.parametrize(
    ("success", "reference", "found"),
    [
        (0.89, 0.55, True),  # the SIG example: its target is reachable, a typical label is not
        (0.69, 0.10, False),  # below the evidence level
        (0.95, 0.80, False),  # every label reachable: a fragile model, not a backdoor
    ],
)
def test_the_additive_signal_needs_the_target_reachable_and_a_typical_label_not(success, reference, found):
    evidence = BackdoorEvidence(
        score=0.3, refined_size_ratio=0.5, additive_success=success, additive_reference=reference
    )
    assert evidence.found is found and evidence.additive_found is found and not evidence.patch_found
    assert ("backdoor evidence" if found else "no backdoor evidence") in evidence.reason()


def test_purify_by_default_removes_a_sig_backdoor_and_says_so(tmp_path):  # 100 s on two CPU cores
    result = purify(
        SIG / "model.onnx",
        SIG / "clean.npz",
        tmp_path / "out.onnx",
        test_data=SIG / "test.npz",
        poison_data=SIG / "poison.npz",
    )
    assert result.guided is not None and result.guided["suspected_target"] == 0
    assert [trigger["kind"] for trigger in result.guided["triggers"]] == ["additive"]  # no patch evidence
    assert result.verdict is not None and result.verdict.name == "purified"
    assert result.repair is not None and result.repair.ran
    assert result.before.asr > 0.7 and result.after.asr <= 0.05
    assert result.before.acc - result.after.acc <= 0.03
