"""The repair stage between deciding and rewriting: measure whether the suspected target's trigger still
works on the pruned model (the triggers refitted to it), repair the kept weights when it does (or when
`--repair always`), and carry the changed weights into the ONNX model.

It runs only after a method that named a target and synthesised triggers for it (`--method trigger`),
and only with backdoor evidence: a model without evidence is left as it came (verdict `clean`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import onnx
import torch

from anp_onnx.bridge.importer import hard_masks
from anp_onnx.bridge.weights import restore, snapshot, trainable_parameters, weight_slots, weight_updates
from anp_onnx.methods.perturbation import tensors
from anp_onnx.methods.registry import Decision, MethodContext
from anp_onnx.methods.repair.settings import RepairSettings
from anp_onnx.methods.repair.unlearning import RepairResult, repair_weights, split
from anp_onnx.onnx.weights import InitializerChange, apply_weights
from anp_onnx.prune import PruningPlan


@dataclass
class RepairOutcome:
    """`checked`: the refitted triggers were measured on the pruned model; `ran`: weights were trained;
    `residual_asr`: the refitted triggers' success on held-out clean inputs of other labels after
    everything (None: not measured); `changes`: the initializers repair wrote and by how much."""

    checked: bool = False
    ran: bool = False
    why: str = ""
    residual_asr: float | None = None
    check: RepairResult | None = None
    result: RepairResult | None = None
    changes: list[InitializerChange] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        entry: dict[str, object] = {"ran": self.ran, "why": self.why}
        if self.residual_asr is not None:
            entry["residual_asr"] = round(self.residual_asr, 4)
        if self.check is not None:
            entry["residual_asr_after_pruning"] = round(self.check.residual_asr, 4)
        if self.result is not None:
            entry.update(self.result.summary())
        entry["changed_initializers"] = [
            {
                "name": change.initializer,
                "relative_change": round(change.relative_change, 6),
                "elements": change.elements,
            }
            for change in self.changes
        ]
        return entry


def repair_stage(
    context: MethodContext,
    decision: Decision,
    settings: RepairSettings,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[onnx.ModelProto, Decision, RepairOutcome]:
    """The model to rewrite (its initializers repaired, or as it was), the decision the rewriter carries
    out (the method's, or no pruning when repair replaced it) and what the stage did. `on_step(done,
    total)` after each repair step. The classifier ends as the returned model and decision compute."""
    summary = decision.summary or {}
    if not decision.triggers or "suspected_target" not in summary:
        return context.model, decision, RepairOutcome(why="the method synthesised no triggers to check against")
    if summary.get("synthesis_failed"):
        return context.model, decision, RepairOutcome(why="the trigger synthesis failed: nothing to repair against")
    if not summary.get("backdoor_evidence", True):
        return context.model, decision, RepairOutcome(why="no backdoor evidence: the model is left as it came")
    target = int(summary["suspected_target"])
    x, y = tensors(context.clean.x, context.clean.y, context.torch_device)
    train, held_out = split(x, y, settings.holdout, settings.seed)
    outcome = RepairOutcome(checked=True)
    outcome.check = repair_weights(
        context.classifier, context.model, train, held_out, decision.triggers, target, replace(settings, max_steps=0)
    )
    outcome.residual_asr = outcome.check.residual_asr
    pruning_left_it = float(summary.get("synthetic_asr_after", 0.0)) > settings.max_asr
    still_works = outcome.check.residual_asr > settings.max_asr
    if settings.mode == "never":
        outcome.why = "--repair never"
    elif settings.mode == "always":
        outcome.why = "--repair always"
    elif pruning_left_it:
        outcome.why = "pruning stopped with the synthetic trigger above the stop level"
    elif still_works:
        outcome.why = "the trigger refitted to the pruned model still works"
    else:
        outcome.why = "pruning removed it: the trigger refitted to the pruned model does not work"
    if settings.mode == "never" or (settings.mode == "auto" and not (pruning_left_it or still_works)):
        return context.model, decision, outcome
    step = (lambda done: on_step(done, settings.max_steps)) if on_step else None
    slots = weight_slots(context.classifier, context.model)
    parameters = trainable_parameters(context.classifier, slots)
    original = snapshot(parameters)
    # Repair starts from the model as given: pruning has spent the accuracy budget that repair needs
    # (docs/METHOD.md), so the repaired model replaces the pruned one unless it does worse.
    hard_masks(context.classifier, PruningPlan(decision.plan.criterion, ()))
    with torch.enable_grad():
        outcome.result = repair_weights(
            context.classifier, context.model, train, held_out, decision.triggers, target, settings, step
        )
    outcome.ran = True
    if decision.plan.neurons and outcome.result.residual_asr > outcome.check.residual_asr:
        restore(parameters, original)
        hard_masks(context.classifier, decision.plan)
        outcome.why += "; the repaired model did worse than the pruned one, which is kept"
        return context.model, decision, outcome
    outcome.residual_asr = outcome.result.residual_asr
    model, outcome.changes = apply_weights(context.model, weight_updates(context.classifier, slots))
    plan = PruningPlan(f"repair: kept weights changed, {outcome.result.stopped_because}", ())
    return model, replace(decision, plan=plan), outcome
