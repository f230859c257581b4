"""Lines the console prints about the stages, in words a user reads."""

from __future__ import annotations

from anp_onnx.methods.repair.stage import RepairOutcome


def repair_line(outcome: RepairOutcome) -> str:
    """`repair: 125 steps (pruning stopped ...); refitted trigger ASR 64.2% -> 1.1%; held-out ACC ...; 9 initializers
    changed (at most 3.1%)` or, when it did not run, why not."""
    after_pruning = outcome.check.residual_asr if outcome.check else None
    if not outcome.ran:
        measured = f"refitted trigger ASR {100 * after_pruning:.1f}%" if after_pruning is not None else ""
        return f"repair: not run ({outcome.why}); {measured}".rstrip("; ")
    result = outcome.result
    largest = max((change.relative_change for change in outcome.changes), default=0.0)
    return (
        f"repair: {result.steps_run} steps ({outcome.why}); refitted trigger ASR {100 * after_pruning:.1f}% -> "
        f"{100 * result.residual_asr:.1f}%; held-out ACC {100 * result.accuracy_reference:.1f}% -> "
        f"{100 * result.clean_accuracy:.1f}%; {len(outcome.changes)} initializers changed "
        f"(relative change at most {100 * largest:.1f}%); stopped: {result.stopped_because}"
    )
