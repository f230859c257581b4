"""The verdict a user and a pipeline read last: was a backdoor found, and is it gone?

- `clean`: no backdoor evidence (the target search's score below the scan's threshold, and the
  suspected target's synthetic trigger does not succeed); the model is written as it came.
- `purified`: evidence found, and the suspected target's synthetic trigger, refitted to the written
  model, succeeds on at most the stop level of clean inputs, within the accuracy budget.
- `residual`: evidence found and the trigger still succeeds above the stop level, or the trigger could not
  be synthesised at all (nothing was measured, so nothing can be promised). Exit code 3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

VERDICTS = ("clean", "purified", "residual")
RESIDUAL_EXIT_CODE = 3


@dataclass(frozen=True)
class Verdict:
    name: str  # one of VERDICTS
    reason: str  # what was measured, one line
    advice: str  # what to try next ("" when nothing is needed)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        """The console's last line."""
        headline = {
            "clean": "verdict: clean - no sign of a backdoor was found",
            "purified": "verdict: purified - the backdoor the clean data revealed no longer works",
            "residual": "verdict: RESIDUAL - a backdoor is still live in the written model; do not ship it",
        }[self.name]
        text = f"{headline} ({self.reason})"
        return f"{text}; {self.advice}" if self.advice else text


def judge(
    *,
    evidence: bool,
    synthesis_failed: bool,
    residual_asr: float | None,
    stop_level: float,
    target: int | None,
) -> Verdict:
    """The verdict from what purify measured on the clean data alone. `residual_asr`: the suspected
    target's synthetic trigger's success on the written model (None: not measured)."""
    label = f"label {target}" if target is not None else "the suspected label"
    if synthesis_failed:
        return Verdict(
            "residual",
            f"the trigger for {label} could not be synthesised, so removal cannot be checked",
            "check --class-output and the data's layout and scaling, or try --method anp",
        )
    if not evidence:
        return Verdict("clean", "the target search's score is below the scan's threshold", "")
    if residual_asr is None:
        return Verdict(
            "residual", f"evidence for {label} found and nothing measured its removal", "run with --repair always"
        )
    if residual_asr <= stop_level + 1e-9:
        return Verdict(
            "purified", f"synthetic trigger for {label} succeeds on {100 * residual_asr:.1f}% of clean inputs", ""
        )
    return Verdict(
        "residual",
        f"synthetic trigger for {label} still succeeds on {100 * residual_asr:.1f}% of clean inputs "
        f"(stop level {100 * stop_level:.0f}%)",
        "try --repair always, a larger --max-acc-drop, or more clean data (--data)",
    )
