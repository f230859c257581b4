"""Which label a backdoor targets, from clean data only.

Two signals: adversarial neuron perturbations push a backdoored model's clean inputs mostly onto the
attacker's target (Wu & Wang's observation), a clean model's errors spread out; and the target is
reached with a much smaller synthesised trigger than the other labels (Neural Cleanse's). The
trigger sizes shortlist the labels, the perturbation's errors pick among them, and a label that takes
most of the perturbation's errors is named even when its trigger is not among the smallest
(`weigh_evidence`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from anp_onnx.bridge.importer import GatedClassifier
from anp_onnx.methods.perturbation import adversarial_noise, noise_parameters, optimisation_mode
from anp_onnx.methods.trigger.shortlist import (
    REFERENCE_LABELS,
    Shortlist,
    needs_shortlist,
    shortlist_labels,
    suspects,
)
from anp_onnx.methods.trigger.synthesis import Trigger, TriggerSettings, label_triggers, output_count

PERTURBATION_ROUNDS = 4  # adversarial neuron perturbations whose errors are counted
LABEL_TRIGGER_STEPS = 100  # per label; the sizes rank the labels alike from about 100 steps (docs/METHOD.md)


def perturbation_errors(
    classifier: GatedClassifier, x: torch.Tensor, y: torch.Tensor, eps: float, rounds: int, seed: int
) -> tuple[np.ndarray, int]:
    """Where adversarial neuron perturbations send the clean samples they misclassify: the count per
    predicted label over `rounds` perturbations (a fresh random start each), and the number of errors.
    The classifier must be calibrated (`perturbation.calibrate`). Large inputs are perturbed in passes
    of `images_per_pass` samples (each its own perturbation), to keep the memory bounded."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noises = noise_parameters(classifier)
    histogram = np.zeros(1, dtype=np.int64)
    errors = 0
    step = images_per_pass(x)
    with optimisation_mode(classifier):
        for _ in range(rounds):
            for start in range(0, len(x), step):
                images, labels = x[start : start + step], y[start : start + step]
                adversarial_noise(classifier, images, labels, noises, eps, generator)
                with torch.no_grad():
                    predicted = classifier(images).argmax(1)
                wrong = predicted != labels
                counts = torch.bincount(predicted[wrong], minlength=int(predicted.max()) + 1).cpu().numpy()
                histogram = _add(histogram, counts)
                errors += int(wrong.sum())
    return histogram, errors


PASS_VALUES = 2_000_000  # input values perturbed in one pass: 500 samples of 3x32x32 (1.5 million) are one


def images_per_pass(x: torch.Tensor) -> int:
    """How many samples one perturbation pass takes: all of the small inputs the bench measured, 16 of
    3x224x224 (at least 16: batch statistics of fewer are noise)."""
    return max(16, PASS_VALUES // max(1, x[0].numel()))


def suspected_target(histogram: np.ndarray) -> tuple[int, float]:
    """The most hit label and its share of the errors (0 when there were none)."""
    target = int(np.argmax(histogram))
    return target, float(histogram[target] / max(1, histogram.sum()))


SIZE_TIE = 0.05  # trigger sizes this close to the smallest are a tie (seed-to-seed noise, docs/METHOD.md)
# A label taking this share of the perturbation's errors is a suspect whatever its trigger's size: clean
# models sent at most 0.49 of their errors to one label, backdoored ones up to 0.93 (docs/METHOD.md)
DOMINANT_SHARE = 0.6


@dataclass(frozen=True)
class TargetEvidence:
    """`share`: the label's share of the perturbation's errors; `size_ratio`: its trigger's size over
    the median size of all labels' triggers; `score`: the stronger of the two signals, the larger of
    `share` and `1 - size_ratio`, in [0, 1] (either alone can fail: docs/METHOD.md); `candidates`: the
    labels the sizes could not tell apart from the named one (itself included), which a longer
    synthesis can (`guided.py`)."""

    label: int
    share: float
    size_ratio: float
    score: float
    candidates: tuple[int, ...]


def weigh_evidence(
    histogram: np.ndarray, sizes: Sequence[float], tie: float = SIZE_TIE, labels: Sequence[int] | None = None
) -> TargetEvidence:
    """The suspected target from both signals: the labels whose trigger is within `tie` of the
    smallest are the candidates, the one of them with most perturbation errors is named, unless a label
    takes at least `DOMINANT_SHARE` of the errors and so scores higher (the candidates are then that
    label alone). `sizes[i]` is the trigger size of label `labels[i]` (default: label i, every label
    searched), `histogram` the perturbation errors per label."""
    sizes = np.asarray(sizes, dtype=np.float64)
    searched = np.arange(len(sizes)) if labels is None else np.asarray(labels, dtype=np.int64)
    shares = _label_shares(histogram, searched)
    ties = np.flatnonzero(sizes <= sizes.min() * (1 + tie))
    chosen = int(ties[np.argmax(shares[ties])])
    dominant = int(np.argmax(shares))
    if shares[dominant] >= DOMINANT_SHARE and _score(shares, sizes, dominant) > _score(shares, sizes, chosen):
        chosen, ties = dominant, np.array([dominant])
    return _evidence_at(searched, shares, sizes, chosen, tuple(int(searched[index]) for index in ties))


def _evidence_at(
    searched: np.ndarray, shares: np.ndarray, sizes: np.ndarray, index: int, candidates: tuple[int, ...]
) -> TargetEvidence:
    """The evidence naming `searched[index]`, from every searched label's error share and trigger size."""
    ratio = float(sizes[index] / np.median(sizes))
    return TargetEvidence(int(searched[index]), float(shares[index]), ratio, _score(shares, sizes, index), candidates)


def _label_shares(histogram: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each of `labels`' share of all the perturbation's errors."""
    outputs = int(max(len(histogram), labels.max() + 1))
    return np.pad(histogram, (0, outputs - len(histogram)))[labels] / max(1, int(histogram.sum()))


def _score(shares: np.ndarray, sizes: np.ndarray, index: int) -> float:
    return max(float(shares[index]), 1.0 - float(sizes[index] / np.median(sizes)), 0.0)


def _add(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    size = max(len(left), len(right))
    return np.pad(left, (0, size - len(left))) + np.pad(right, (0, size - len(right)))


@dataclass(frozen=True)
class TargetSearch:
    """Both signals and the verdict: `histogram[label]` counts the perturbation's errors that land on
    each label (`errors` in all), `triggers[i]` is the patch trigger synthesised for label `labels[i]`:
    every label in order, or the `shortlist`'s labels where there were too many (`shortlist.py`)."""

    evidence: TargetEvidence
    histogram: np.ndarray
    errors: int
    triggers: list[Trigger]
    error_rate: float  # errors per perturbed sample
    shortlist: Shortlist | None = None

    @property
    def labels(self) -> list[int]:
        return [trigger.target for trigger in self.triggers]

    def naming(self, label: int) -> TargetSearch:
        """This search with `label`, one of the searched labels, named the suspected target instead."""
        searched = np.asarray(self.labels, dtype=np.int64)
        shares, sizes = _label_shares(self.histogram, searched), np.asarray(self.sizes, dtype=np.float64)
        evidence = _evidence_at(searched, shares, sizes, self.labels.index(label), self.evidence.candidates)
        return replace(self, evidence=evidence)

    @property
    def sizes(self) -> list[float]:
        return [trigger.size for trigger in self.triggers]


def searched_labels(labels: int) -> int:
    """How many labels the search synthesises a trigger for, of a classifier with `labels` outputs."""
    return min(labels, suspects(labels) + REFERENCE_LABELS) if needs_shortlist(labels) else labels


def search_steps(labels: int, trigger_steps: int = LABEL_TRIGGER_STEPS) -> int:
    """The trigger steps of the search on `labels` outputs: a trigger per searched label, and the
    shortlist's universal patch where there is one."""
    return (searched_labels(labels) + int(needs_shortlist(labels))) * trigger_steps


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
    neuron perturbations, a patch trigger for every label, or for a shortlist of them above
    `SEARCH_EVERY_LABEL` labels (`on_label(done, total)` after each of the `search_steps` // `trigger_steps`
    syntheses), weighed."""
    histogram, errors = perturbation_errors(classifier, x, y, eps, rounds, seed)
    # float32: the sizes name the target by a 5% margin, and bfloat16 moves a label's size by as much as
    # another seed does (up to 6% measured, docs/PERFORMANCE.md)
    trigger_settings = TriggerSettings("patch", trigger_steps, trigger_batch, seed=seed, bfloat16=False)
    outputs = output_count(classifier, x)
    total, shortlist = search_steps(outputs, trigger_steps) // trigger_steps, None
    if needs_shortlist(outputs):
        shortlist = shortlist_labels(classifier, x, y, histogram, outputs, trigger_settings)
        if on_label is not None:
            on_label(1, total)
    labels = shortlist.labels if shortlist else list(range(outputs))
    progress = (lambda done, count: on_label(total - count + done, total)) if on_label else None
    triggers = label_triggers(classifier, x, y, trigger_settings, progress, labels)
    evidence = weigh_evidence(histogram, [trigger.size for trigger in triggers], labels=labels)
    return TargetSearch(evidence, histogram, errors, triggers, errors / (rounds * len(y)), shortlist)
