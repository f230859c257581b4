"""Trigger-guided pruning (`--method trigger`, the default): ANP's adversarial neuron perturbation
names the suspected target label, a trigger for that label is synthesised from the clean data, and
the neurons that trigger relies on are pruned one at a time within a clean-accuracy budget.

Why not the masks alone: on narrow networks ANP's masks do not isolate the backdoor neurons
(docs/METHOD.md); the perturbation's errors still point at the target label reliably, and a trigger
synthesised for it gives a clean-data stand-in for the attack that pruning can be judged against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from anp_onnx.anp import AnpSettings
from anp_onnx.importer import GatedClassifier
from anp_onnx.prune import PruningPlan
from anp_onnx.target import perturbation_errors, suspected_target
from anp_onnx.trigger import Trigger, TriggerSettings, synthesise_trigger
from anp_onnx.trigger_pruning import TriggerPruningResult, TriggerPruningSettings, prune_against_trigger

TARGET_ROUNDS = 4  # adversarial neuron perturbations whose errors name the target (as `anp-onnx scan`)
DEFAULT_MAX_ACC_DROP = TriggerPruningSettings().max_acc_drop  # the budget, on the clean data given
TRIGGER_KINDS = ("patch",)  # adding "blend" made Blend cells worse (docs/METHOD.md)


@dataclass
class GuidedResult:
    target: int
    target_share: float  # share of the perturbation's errors on the target
    triggers: list[Trigger]
    pruning: TriggerPruningResult

    @property
    def plan(self) -> PruningPlan:
        return self.pruning.plan

    def summary(self) -> dict[str, object]:
        return {
            "suspected_target": self.target,
            "target_share": round(self.target_share, 4),
            "triggers": [trigger.summary() for trigger in self.triggers],
            **self.pruning.summary(),
        }


def guided_prune(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AnpSettings,
    max_acc_drop: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> GuidedResult:
    """The three stages on calibrated `classifier` (`anp.calibrate`) and clean `x, y`; its masks end hard."""
    histogram, _ = perturbation_errors(classifier, x, y, settings.eps, TARGET_ROUNDS, settings.seed)
    target, share = suspected_target(histogram)
    triggers = []
    for number, kind in enumerate(TRIGGER_KINDS):
        trigger_settings = TriggerSettings(kind, seed=settings.seed)
        offset = number * trigger_settings.steps  # progress counts the steps of all triggers in a row
        progress = (lambda step, offset=offset: on_step(offset + step)) if on_step else None
        triggers.append(synthesise_trigger(classifier, x, y, target, trigger_settings, progress))
    pruning_settings = (
        TriggerPruningSettings() if max_acc_drop is None else TriggerPruningSettings(max_acc_drop=max_acc_drop)
    )
    pruning = prune_against_trigger(classifier, x, y, triggers, pruning_settings)
    return GuidedResult(target, share, triggers, pruning)
