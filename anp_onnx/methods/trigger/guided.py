"""Trigger-guided pruning (`--method trigger`, the default): the backdoor's target label is named from
clean data (as `anp-onnx scan` does: adversarial neuron perturbations and a trigger per label), triggers
for that label are synthesised, masks are unlearned against them, and the neurons the triggers rely on
are pruned one at a time within a clean-accuracy budget.

Why not the masks alone: on narrow networks ANP's masks do not isolate the backdoor neurons
(docs/METHOD.md); the perturbation's errors and the triggers' sizes still point at the target label, and
triggers synthesised for it give a clean-data stand-in for the attack that pruning can be judged against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from anp_onnx.bridge.fast_eval import precision_name
from anp_onnx.bridge.importer import GatedClassifier
from anp_onnx.methods.anp import mask_values
from anp_onnx.methods.perturbation import calibrate, tensors
from anp_onnx.methods.registry import Decision, MethodContext, Progress
from anp_onnx.methods.settings import TriggerMethodSettings
from anp_onnx.methods.trigger.additive import DEFAULT_STEPS as ADDITIVE_STEPS
from anp_onnx.methods.trigger.additive import synthesise_additive
from anp_onnx.methods.trigger.evidence import BackdoorEvidence, weigh
from anp_onnx.methods.trigger.pruning import TriggerPruningResult, TriggerPruningSettings, prune_against_trigger
from anp_onnx.methods.trigger.synthesis import Trigger, TriggerSettings, synthesise_trigger
from anp_onnx.methods.trigger.target import LABEL_TRIGGER_STEPS, TargetSearch, search_steps, search_target
from anp_onnx.methods.trigger.unlearning import UnlearningSettings, unlearning_ranking
from anp_onnx.prune import PruningPlan
from anp_onnx.timing import timed

DEFAULT_MAX_ACC_DROP = TriggerPruningSettings().max_acc_drop  # the budget, on the clean data given
BLEND_STEPS = 200  # the blend's opacity ranks labels alike from 200 steps as from 400 (docs/METHOD.md)
ANOMALOUS_BLEND = 0.5  # the blend is pruned against when the target's opacity is at most this x a typical label's
SEARCH, TRIGGERS, UNLEARNING = "searching labels", "synthesising triggers", "unlearning masks"  # the stages


@dataclass(frozen=True)
class GuidedSettings:
    """Steps (and the label search's batch) of each stage; the defaults are what the benchmark
    measured (docs/RESULTS.md). Fewer are faster and, measured, worse (docs/PERFORMANCE.md)."""

    label_trigger_steps: int = LABEL_TRIGGER_STEPS
    label_trigger_batch: int = TriggerSettings().batch_size
    patch_steps: int = TriggerSettings().steps
    blend_steps: int = BLEND_STEPS
    additive_steps: int = ADDITIVE_STEPS
    unlearning_steps: int = UnlearningSettings().steps

    def scaled(self, factor: float) -> GuidedSettings:
        """Every count times `factor`, rounded, at least 1."""
        return replace(self, **{item.name: max(1, round(getattr(self, item.name) * factor)) for item in fields(self)})


@dataclass
class GuidedResult:
    """`triggers`: the ones pruned against (the patch when the search or its size is evidence, the blend
    when anomalous, the additive trigger when it is evidence); `blend_reference` and `additive_reference`:
    the blend and additive triggers synthesised for a typical label, which the target's are compared with."""

    search: TargetSearch
    triggers: list[Trigger]
    blend_reference: Trigger
    pruning: TriggerPruningResult
    evidence: BackdoorEvidence
    additive: Trigger  # the suspected label's additive trigger, pruned against or not
    additive_reference: Trigger
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    stages: GuidedSettings = field(default_factory=GuidedSettings)
    precision: str = "float32"  # what trigger synthesis and unlearning computed in (fast_eval.reduced_precision)
    candidates: list[Trigger] = field(default_factory=list)  # a full patch per label the search could not tell apart

    @property
    def target(self) -> int:
        return self.search.evidence.label

    @property
    def plan(self) -> PruningPlan:
        return self.pruning.plan

    @property
    def synthesis_failed(self) -> bool:
        """The triggers never reached the target: nothing was pruned, and no verdict may rest on it."""
        return self.pruning.synthesis_failed

    def summary(self) -> dict[str, object]:
        evidence = self.search.evidence
        return {
            "suspected_target": self.target,
            "target_candidates": [trigger.summary() for trigger in self.candidates],
            "target_share": round(evidence.share, 4),
            "size_ratio": round(evidence.size_ratio, 4),
            "score": round(evidence.score, 4),
            "error_rate": round(self.search.error_rate, 4),
            "label_histogram": [int(count) for count in self.search.histogram],
            "label_trigger_sizes": [round(size, 2) for size in self.search.sizes],
            "label_trigger_labels": self.search.labels,
            "label_shortlist": self.search.shortlist.summary() if self.search.shortlist else None,
            "triggers": [trigger.summary() for trigger in self.triggers],
            "blend_reference": self.blend_reference.summary(),
            "additive": self.additive.summary(),
            "additive_reference": self.additive_reference.summary(),
            **self.pruning.summary(),
            **self.evidence.summary(),
            "stage_seconds": self.seconds,
            "stage_steps": asdict(self.stages),
            "precision": self.precision,
        }


def guided_stage_steps(labels: int, stages: GuidedSettings | None = None) -> dict[str, int]:
    """The steps `guided_prune` reports through `on_step` for a classifier with `labels` classes, by
    stage, in order: a label's trigger is a step of the search. Each stage's steps cost alike, which
    steps of different stages do not (`--effort` cuts the search's batch to a few images, and the
    search computes in float32 where the target's triggers may use bfloat16), so each stage gets a
    pace, and a time estimate, of its own. The trigger stage is counted for one candidate label; it
    grows where the search leaves several (`guided_prune`'s `on_stage_steps`)."""
    stages = stages or GuidedSettings()
    return {
        SEARCH: search_steps(labels, stages.label_trigger_steps) // stages.label_trigger_steps,
        TRIGGERS: trigger_stage_steps(stages, 1),
        UNLEARNING: stages.unlearning_steps,
    }


def trigger_stage_steps(stages: GuidedSettings, candidates: int) -> int:
    """The trigger stage's steps: a patch per candidate label, the blend and additive triggers for the
    target and a typical label."""
    return candidates * stages.patch_steps + 2 * stages.blend_steps + 2 * stages.additive_steps


def guided_prune(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    seed: int = 0,
    max_acc_drop: float | None = None,
    on_step: Callable[[str], None] | None = None,
    stages: GuidedSettings | None = None,
    on_stage_steps: Callable[[str, int], None] | None = None,
) -> GuidedResult:
    """The stages on calibrated `classifier` (`perturbation.calibrate`) and clean `x, y`; its masks end hard.
    `eps`: the label search's neuron perturbation; `on_step(stage)` after each of the `guided_stage_steps`
    steps of the label search, trigger synthesis and unlearning (`on_stage_steps(stage, steps)` when a
    stage takes more steps than `guided_stage_steps` said: a full patch trigger for each of the search's
    candidates, the smallest naming the target). Without backdoor evidence (`evidence.py`) nothing is
    unlearned or pruned: the triggers are only measured."""
    stages = stages or GuidedSettings()
    step = (lambda *_: on_step(TRIGGERS)) if on_step else None
    label_progress = (lambda *_: on_step(SEARCH)) if on_step else None
    unlearning_step = (lambda *_: on_step(UNLEARNING)) if on_step else None
    seconds: dict[str, float] = {}
    with timed(seconds, "target"):
        search = search_target(
            classifier,
            x,
            y,
            eps=eps,
            trigger_steps=stages.label_trigger_steps,
            trigger_batch=stages.label_trigger_batch,
            seed=seed,
            on_label=label_progress,
        )
    with timed(seconds, "triggers"):
        patch_settings = TriggerSettings("patch", steps=stages.patch_steps, seed=seed)
        candidates = search.evidence.candidates
        if len(candidates) > 1 and on_stage_steps is not None:
            on_stage_steps(TRIGGERS, trigger_stage_steps(stages, len(candidates)))
        patches = [synthesise_trigger(classifier, x, y, label, patch_settings, step) for label in candidates]
        patch = smallest_reaching(patches)
        search = search.naming(patch.target)
        target = patch.target
        blend_settings = TriggerSettings("blend", steps=stages.blend_steps, seed=seed)
        blend = synthesise_trigger(classifier, x, y, target, blend_settings, step)
        typical = typical_label(search)
        reference = synthesise_trigger(classifier, x, y, typical, blend_settings, step)
        additive, additive_reference = (
            synthesise_additive(classifier, x, y, label, steps=stages.additive_steps, seed=seed, on_step=step)
            for label in (target, typical)
        )
    evidence = weigh(search.evidence.score, patch.size, search.sizes, additive.success, additive_reference.success)
    triggers = [patch] if evidence.patch_found or not evidence.additive_found else []
    if blend.size <= ANOMALOUS_BLEND * reference.size:
        triggers.append(blend)
    if evidence.additive_found:
        triggers.append(additive)
    pruning_settings = (
        TriggerPruningSettings() if max_acc_drop is None else TriggerPruningSettings(max_acc_drop=max_acc_drop)
    )
    ranking = None
    if evidence.found:
        with timed(seconds, "unlearning"):
            unlearning = UnlearningSettings(steps=stages.unlearning_steps, seed=seed)
            ranking = unlearning_ranking(classifier, x, y, triggers, unlearning, unlearning_step)
    if not evidence.found:
        pruning_settings = replace(pruning_settings, max_rounds=0)
    with timed(seconds, "pruning"):
        pruning = prune_against_trigger(classifier, x, y, triggers, pruning_settings, ranking=ranking)
    if not evidence.found and not pruning.synthesis_failed:
        pruning.stopped_because = evidence.reason()
    precision = precision_name(classifier, x.device)
    return GuidedResult(
        search,
        triggers,
        reference,
        pruning,
        evidence,
        additive,
        additive_reference,
        seconds,
        stages,
        precision,
        patches if len(patches) > 1 else [],
    )


def decide(context: MethodContext, settings: TriggerMethodSettings, progress: Progress | None = None) -> Decision:
    """`--method trigger`: calibrate on the clean data, then `guided_prune`; `progress` after each step."""
    torch.manual_seed(settings.seed)
    x, y = tensors(context.clean.x, context.clean.y, context.torch_device)
    calibrate(context.classifier, x, neuron_mode=settings.neuron_mode)
    step = grown = None
    if progress is not None:
        totals = guided_stage_steps(context.classes, settings.stages)
        done = dict.fromkeys(totals, 0)

        def step(stage: str) -> None:
            done[stage] += 1
            progress(done[stage], totals[stage], stage)

        def grown(stage: str, steps: int) -> None:
            totals[stage] = steps

    guided = guided_prune(
        context.classifier,
        x,
        y,
        eps=settings.eps,
        seed=settings.seed,
        max_acc_drop=settings.max_acc_drop,
        on_step=step,
        stages=settings.stages,
        on_stage_steps=grown,
    )
    return Decision(guided.plan, mask_values(context.classifier), guided.summary(), list(guided.triggers))


def smallest_reaching(patches: list[Trigger]) -> Trigger:
    """The smallest of the candidates' patch triggers that reach their label (the smallest of all if none does):
    a backdoor's trigger keeps shrinking with more steps, a natural label's does not (`evidence.py`)."""
    reaching = TriggerPruningSettings().min_trigger_success
    return min(patches, key=lambda trigger: (trigger.success < reaching, trigger.size))


def typical_label(search: TargetSearch) -> int:
    """Of the labels other than the suspected target, the one whose patch trigger has the median size (the
    lower one of an even count: where the target's trigger is the smallest, the upper median of all labels)."""
    ranked = sorted(
        (trigger for trigger in search.triggers if trigger.target != search.evidence.label),
        key=lambda trigger: trigger.size,
    )
    return ranked[(len(ranked) - 1) // 2].target if ranked else search.evidence.label
