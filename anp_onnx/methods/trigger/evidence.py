"""Is there a backdoor to remove? Two signals from the clean data alone, either of which is evidence:

- the target search's score (`target.weigh_evidence`): the suspected label's share of the adversarial
  neuron perturbation's errors, or how much smaller its 100-step patch trigger is than the median
  label's; at least `SUSPICIOUS_SCORE` (above all 11 clean models measured, 0.27-0.41);
- the refined size ratio: the suspected label's patch trigger after the full synthesis (400 steps)
  over the median label's 100-step size. A backdoor's trigger keeps shrinking with more steps, a
  natural label's does not: at most `REFINED_SIZE_RATIO` (bench of 2026-12-07: backdoored
  models 0.11-0.47, clean models 0.35-0.49; docs/METHOD.md).

Without evidence purify changes nothing (verdict `clean`): pruning a clean model's label against its
natural features costs accuracy and removes nothing. SIG's global sinusoid gives neither signal on the
bench (score 0.39, refined ratio 0.46): the detector's known limit, docs/RESULTS.md.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

SUSPICIOUS_SCORE = 0.45
REFINED_SIZE_RATIO = 0.3


@dataclass(frozen=True)
class BackdoorEvidence:
    score: float
    refined_size_ratio: float

    @property
    def found(self) -> bool:
        return self.score >= SUSPICIOUS_SCORE or self.refined_size_ratio <= REFINED_SIZE_RATIO

    def reason(self) -> str:
        signals = f"score {self.score:.3f} (evidence from {SUSPICIOUS_SCORE:g}), refined trigger size ratio "
        signals += f"{self.refined_size_ratio:.3f} (evidence up to {REFINED_SIZE_RATIO:g})"
        return f"backdoor evidence: {signals}" if self.found else f"no backdoor evidence: {signals}"

    def summary(self) -> dict[str, object]:
        return {
            "backdoor_evidence": self.found,
            "refined_size_ratio": round(self.refined_size_ratio, 4),
            "evidence": self.reason(),
        }


def weigh(score: float, patch_size: float, label_sizes: list[float]) -> BackdoorEvidence:
    """The evidence from the search's `score`, the suspected label's full patch trigger size and every
    label's 100-step size."""
    median = statistics.median(label_sizes) if label_sizes else 0.0
    return BackdoorEvidence(score, patch_size / median if median > 0 else 1.0)
