"""Is there a backdoor to remove? Three signals from the clean data alone, any of which is evidence:

- the target search's score (`target.weigh_evidence`): the suspected label's share of the adversarial
  neuron perturbation's errors, or how much smaller its 100-step patch trigger is than the median
  label's; at least `SUSPICIOUS_SCORE` (above all 11 clean models measured, 0.27-0.41);
- the refined size ratio: the suspected label's patch trigger after the full synthesis (400 steps)
  over the median label's 100-step size. A backdoor's trigger keeps shrinking with more steps, a
  natural label's does not: at most `REFINED_SIZE_RATIO` (bench of 2026-12-07: backdoored
  models 0.11-0.47, clean models 0.35-0.49; docs/METHOD.md);
- the additive success (`additive.py`): the share of other labels' clean inputs that a faint universal
  perturbation sends to the suspected label, at least `ADDITIVE_SUCCESS` while a typical label's (the one
  the blend reference is made for) stays below it. An attack that adds its trigger over the whole image
  (SIG) gives neither signal above; on the bench SIG's target reached 0.89 (its typical label 0.55), every
  label of every clean model at most 0.47 (docs/METHOD.md). The typical label keeps a model that is
  fragile everywhere (every label reachable) from counting as backdoored.

Without evidence purify changes nothing (verdict `clean`): pruning a clean model's label against its
natural features costs accuracy and removes nothing.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

SUSPICIOUS_SCORE = 0.45
REFINED_SIZE_RATIO = 0.3
ADDITIVE_SUCCESS = 0.7


@dataclass(frozen=True)
class BackdoorEvidence:
    score: float
    refined_size_ratio: float
    additive_success: float  # the suspected label's additive trigger
    additive_reference: float  # a typical label's

    @property
    def patch_found(self) -> bool:
        """Evidence from the search and the patch trigger: the patch stands in for the attack."""
        return self.score >= SUSPICIOUS_SCORE or self.refined_size_ratio <= REFINED_SIZE_RATIO

    @property
    def additive_found(self) -> bool:
        """Evidence from the additive trigger: it stands in for the attack."""
        return self.additive_success >= ADDITIVE_SUCCESS > self.additive_reference

    @property
    def found(self) -> bool:
        return self.patch_found or self.additive_found

    def reason(self) -> str:
        signals = f"score {self.score:.3f} (evidence from {SUSPICIOUS_SCORE:g}), refined trigger size ratio "
        signals += f"{self.refined_size_ratio:.3f} (evidence up to {REFINED_SIZE_RATIO:g}), additive trigger "
        signals += f"success {self.additive_success:.3f} against a typical label's {self.additive_reference:.3f} "
        signals += f"(evidence from {ADDITIVE_SUCCESS:g}, the typical label's below)"
        return f"backdoor evidence: {signals}" if self.found else f"no backdoor evidence: {signals}"

    def summary(self) -> dict[str, object]:
        return {
            "backdoor_evidence": self.found,
            "refined_size_ratio": round(self.refined_size_ratio, 4),
            "additive_success": round(self.additive_success, 4),
            "additive_reference": round(self.additive_reference, 4),
            "evidence": self.reason(),
        }


def weigh(
    score: float,
    patch_size: float,
    label_sizes: list[float],
    additive_success: float,
    additive_reference: float,
) -> BackdoorEvidence:
    """The evidence from the search's `score`, the suspected label's full patch trigger size against every
    label's 100-step size, and the additive triggers' successes (the suspected label's, a typical label's)."""
    median = statistics.median(label_sizes) if label_sizes else 0.0
    ratio = patch_size / median if median > 0 else 1.0
    return BackdoorEvidence(score, ratio, additive_success, additive_reference)
