"""Which label a backdoor targets, from clean data only.

Two signals: adversarial neuron perturbations push a backdoored model's clean inputs mostly onto the
attacker's target (Wu & Wang's observation), a clean model's errors spread out; and the target is
reached with a much smaller synthesised trigger than the other labels (Neural Cleanse's). The
trigger sizes shortlist the labels, the perturbation's errors pick among them (`weigh_evidence`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anp_onnx.bridge.importer import GatedClassifier
from anp_onnx.methods.perturbation import adversarial_noise, noise_parameters, optimisation_mode
from anp_onnx.methods.trigger.synthesis import Trigger, TriggerSettings, label_triggers

PERTURBATION_ROUNDS = 4  # adversarial neuron perturbations whose errors are counted
LABEL_TRIGGER_STEPS = 100  # per label; the sizes rank the labels alike from about 100 steps (docs/METHOD.md)


def perturbation_errors(
    classifier: GatedClassifier, x: torch.Tensor, y: torch.Tensor, eps: float, rounds: int, seed: int
) -> tuple[np.ndarray, int]:
    """Where adversarial neuron perturbations send the clean samples they misclassify: the count per
    predicted label over `rounds` perturbations (a fresh random start each), and the number of errors.
    The classifier must be calibrated (`perturbation.calibrate`)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noises = noise_parameters(classifier)
    histogram = np.zeros(1, dtype=np.int64)
    errors = 0
    with optimisation_mode(classifier):
        for _ in range(rounds):
            adversarial_noise(classifier, x, y, noises, eps, generator)
            with torch.no_grad():
                predicted = classifier(x).argmax(1)
            wrong = predicted != y
            counts = torch.bincount(predicted[wrong], minlength=int(predicted.max()) + 1).cpu().numpy()
            histogram = _add(histogram, counts)
            errors += int(wrong.sum())
    return histogram, errors


def suspected_target(histogram: np.ndarray) -> tuple[int, float]:
    """The most hit label and its share of the errors (0 when there were none)."""
    target = int(np.argmax(histogram))
    return target, float(histogram[target] / max(1, histogram.sum()))


SIZE_TIE = 0.05  # trigger sizes this close to the smallest are a tie (seed-to-seed noise, docs/METHOD.md)


@dataclass(frozen=True)
class TargetEvidence:
    """`share`: the label's share of the perturbation's errors; `size_ratio`: its trigger's size over
    the median size of all labels' triggers; `score`: the stronger of the two signals, the larger of
    `share` and `1 - size_ratio`, in [0, 1] (either alone can fail: docs/METHOD.md)."""

    label: int
    share: float
    size_ratio: float
    score: float


def weigh_evidence(histogram: np.ndarray, sizes: Sequence[float], tie: float = SIZE_TIE) -> TargetEvidence:
    """The suspected target from both signals: the labels whose trigger is within `tie` of the
    smallest are the shortlist, the one of them with most perturbation errors is the target.
    `sizes[label]` is the trigger size of each label, `histogram` the perturbation errors per label."""
    sizes = np.asarray(sizes, dtype=np.float64)
    counts = np.pad(histogram, (0, max(0, len(sizes) - len(histogram))))[: len(sizes)]
    shares = counts / max(1, int(counts.sum()))
    shortlist = np.flatnonzero(sizes <= sizes.min() * (1 + tie))
    label = int(shortlist[np.argmax(shares[shortlist])])
    ratio = float(sizes[label] / np.median(sizes))
    score = max(float(shares[label]), 1.0 - ratio, 0.0)
    return TargetEvidence(label, float(shares[label]), ratio, score)


def _add(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    size = max(len(left), len(right))
    return np.pad(left, (0, size - len(left))) + np.pad(right, (0, size - len(right)))


@dataclass(frozen=True)
class TargetSearch:
    """Both signals for every label and the verdict: `histogram[label]` counts the perturbation's errors
    that land on it (`errors` in all), `triggers[label]` is the patch trigger synthesised for it."""

    evidence: TargetEvidence
    histogram: np.ndarray
    errors: int
    triggers: list[Trigger]
    error_rate: float  # errors per perturbed sample

    @property
    def sizes(self) -> list[float]:
        return [trigger.size for trigger in self.triggers]


def search_target(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    rounds: int = PERTURBATION_ROUNDS,
    trigger_steps: int = LABEL_TRIGGER_STEPS,
    trigger_batch: int = TriggerSettings().batch_size,
    seed: int = 0,
    on_label: Callable[[int, int], None] | None = None,
) -> TargetSearch:
    """The suspected target of calibrated `classifier` (`perturbation.calibrate`) from clean `x, y`: adversarial
    neuron perturbations, a patch trigger for every label (`on_label(label, labels)` after each), weighed."""
    histogram, errors = perturbation_errors(classifier, x, y, eps, rounds, seed)
    # float32: the sizes name the target by a 5% margin, and bfloat16 moves a label's size by as much as
    # another seed does (up to 6% measured, docs/PERFORMANCE.md)
    trigger_settings = TriggerSettings("patch", trigger_steps, trigger_batch, seed=seed, bfloat16=False)
    triggers = label_triggers(classifier, x, y, trigger_settings, on_label)
    evidence = weigh_evidence(histogram, [trigger.size for trigger in triggers])
    return TargetSearch(evidence, histogram, errors, triggers, errors / (rounds * len(y)))
