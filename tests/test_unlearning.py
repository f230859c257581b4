"""Masks unlearned against a synthetic trigger rank first the neurons the trigger's path runs through,
on the bundled BadNets example (tools/make_examples.py trains it); the model is left as it was."""

import torch

from anp_onnx.methods.trigger.synthesis import TriggerSettings, hit_rate, synthesise_trigger
from anp_onnx.methods.trigger.unlearning import UnlearningSettings, unlearning_ranking

QUICK = UnlearningSettings(steps=120)


def synthetic_asr_with_pruned(classifier, trigger, x, y, neurons) -> float:
    with torch.no_grad():
        for index, channel in neurons:
            classifier.gates[index].mask[channel] = 0.0
    others = x[y != trigger.target]
    asr = hit_rate(classifier, trigger.stamp(others), torch.full((len(others),), trigger.target))
    with torch.no_grad():
        for gate in classifier.gates:
            gate.mask.fill_(1.0)
    return asr


def test_the_first_neurons_of_the_ranking_carry_the_trigger_and_the_masks_end_whole(calibrated_example):
    classifier, x, y = calibrated_example("badnets_resnet_bn")  # BadNets patch, target 0
    trigger = synthesise_trigger(classifier, x, y, target=0, settings=TriggerSettings(steps=150))
    with torch.no_grad():
        outputs_before = classifier(x[:32])
    ranking = unlearning_ranking(classifier, x, y, [trigger], QUICK)
    total = sum(len(gate.mask) for gate in classifier.gates)
    assert len(ranking) == len(set(ranking)) == total
    assert all(bool((gate.mask == 1).all()) for gate in classifier.gates)
    with torch.no_grad():
        assert torch.equal(classifier(x[:32]), outputs_before)
    first = synthetic_asr_with_pruned(classifier, trigger, x, y, ranking[:24])
    middle = synthetic_asr_with_pruned(classifier, trigger, x, y, ranking[160:184])
    last = synthetic_asr_with_pruned(classifier, trigger, x, y, ranking[-24:])
    assert first < 0.5 and min(middle, last) > 0.9
