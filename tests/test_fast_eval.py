"""The eval-mode speed-ups keep the classifier's function: BatchNorm folded into the Conv before it
(with the gate on the BatchNorm's output still applied), channels-last weights, identity gates skipped,
and bfloat16 only where the hardware has it and the user has not turned it off. Real onnx2torch
conversions of the bundled examples (tools/make_examples.py)."""

import pytest
import torch
from torch import nn

from anp_onnx.bridge.fast_eval import (
    FULL_PRECISION_VARIABLE,
    bfloat16_native,
    bfloat16_pays,
    bypassed_identity_gates,
    channels_last,
    fast_eval,
    foldable_pairs,
    folded_batch_norm,
    precision_name,
    reduced_precision,
)
from anp_onnx.methods.trigger.synthesis import TriggerSettings, synthesise_trigger


def outputs(classifier, x):
    with torch.no_grad():
        return classifier(x)


def test_folding_batch_norm_keeps_the_outputs_and_puts_every_module_back(calibrated_example):
    classifier, x, _ = calibrated_example("badnets_resnet_bn")
    classifier.eval()
    modules_before = dict(classifier.graph_module.named_children())
    batch_norms = [name for name, module in modules_before.items() if isinstance(module, nn.BatchNorm2d)]
    assert len(foldable_pairs(classifier.graph_module)) == len(batch_norms) > 0
    expected = outputs(classifier, x[:64])
    with folded_batch_norm(classifier):
        assert not any(isinstance(module, nn.BatchNorm2d) for module in classifier.graph_module.children())
        folded = outputs(classifier, x[:64])
    assert torch.allclose(folded, expected, atol=1e-4)
    assert dict(classifier.graph_module.named_children()) == modules_before
    assert torch.equal(outputs(classifier, x[:64]), expected)


def test_a_pruned_batch_norm_channel_stays_pruned_when_folded(calibrated_example):
    classifier, x, _ = calibrated_example("badnets_resnet_bn")
    classifier.eval()
    with torch.no_grad():
        classifier.gates[0].mask[:4] = 0.0
    expected = outputs(classifier, x[:64])
    with fast_eval(classifier):
        assert torch.allclose(outputs(classifier, x[:64]), expected, atol=1e-4)


def test_a_model_with_batch_norm_folded_by_its_exporter_has_nothing_to_fold(calibrated_example):
    classifier, _, _ = calibrated_example("badnets_resnet_folded")
    assert foldable_pairs(classifier.graph_module) == []


def test_nothing_is_folded_in_train_mode(calibrated_example):
    classifier, _, _ = calibrated_example("badnets_resnet_bn")
    classifier.train()
    modules_before = dict(classifier.graph_module.named_children())
    with folded_batch_norm(classifier):
        assert dict(classifier.graph_module.named_children()) == modules_before


def test_channels_last_weights_return_to_contiguous_order(calibrated_example):
    classifier, x, _ = calibrated_example("badnets_resnet_bn")
    classifier.eval()
    expected = outputs(classifier, x[:64])
    convolution_weights = [parameter for parameter in classifier.parameters() if parameter.ndim == 4]
    with channels_last(classifier):
        assert all(weight.is_contiguous(memory_format=torch.channels_last) for weight in convolution_weights)
        assert torch.allclose(outputs(classifier, x[:64]), expected, atol=1e-4)
    assert all(weight.is_contiguous() for weight in convolution_weights)


def test_only_gates_that_are_the_identity_are_bypassed(calibrated_example):
    classifier, x, _ = calibrated_example("badnets_resnet_bn")
    classifier.eval()
    with torch.no_grad():
        classifier.gates[1].mask[0] = 0.0
    expected = outputs(classifier, x[:64])
    with bypassed_identity_gates(classifier):
        assert [gate.bypassed for gate in classifier.gates[:3]] == [True, False, True]
        assert torch.equal(outputs(classifier, x[:64]), expected)
    assert not any(gate.bypassed for gate in classifier.gates)


def test_a_whole_gate_returns_its_input_exactly_and_a_closed_one_its_pruned_value(calibrated_example):
    classifier, _, _ = calibrated_example("badnets_resnet_bn")
    gate = classifier.gates[0]
    activation = torch.randn(8, len(gate.mask), 5, 5)
    assert torch.equal(gate(activation), activation)
    with torch.no_grad():
        gate.mask.zero_()
    assert torch.equal(gate(activation), gate.pruned_value.view(1, -1, 1, 1).expand_as(activation))


def test_full_precision_can_be_forced(calibrated_example, monkeypatch):
    classifier, _, _ = calibrated_example("badnets_resnet_bn")
    monkeypatch.setenv(FULL_PRECISION_VARIABLE, "1")
    assert precision_name(classifier, torch.device("cpu")) == "float32"
    with reduced_precision(classifier, torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_grouped_convolutions_stay_in_float32_on_a_cpu():
    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    assert not bfloat16_pays(depthwise, torch.device("cpu"))


@pytest.mark.skipif(not bfloat16_native(torch.device("cpu")), reason="this CPU has no native bfloat16")
def test_a_trigger_synthesised_in_bfloat16_matches_the_float32_one(calibrated_example, monkeypatch):
    classifier, x, y = calibrated_example("badnets_resnet_bn")
    assert precision_name(classifier, torch.device("cpu")) == "bfloat16"
    settings = TriggerSettings("patch", steps=100)
    reduced = synthesise_trigger(classifier, x, y, 0, settings)
    monkeypatch.setenv(FULL_PRECISION_VARIABLE, "1")
    full = synthesise_trigger(classifier, x, y, 0, settings)
    assert reduced.size == pytest.approx(full.size, rel=0.02)
    assert abs(reduced.success - full.success) <= 0.02
