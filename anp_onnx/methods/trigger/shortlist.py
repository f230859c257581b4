"""Which labels the target search synthesises a trigger for when there are too many to try each one.

A patch trigger per label costs `LABEL_TRIGGER_STEPS` optimisation steps, so a search over every label
grows linearly with them (1,000 labels: a hundred times the 10-label search). Up to `SEARCH_EVERY_LABEL`
labels every one is still searched (the 10-label bench's search, unchanged). Above that, three cheap
signals rank every label, at a cost that does not grow with the labels:

- perturbation: the label's share of the adversarial neuron perturbation's errors (the search's first
  signal, already counted);
- logits: how often the label is among the `top_logits(labels)` highest logits of clean samples of other
  labels (K-Arm's pre-screening, Shen et al. ICML 2021: a backdoor's target is a runner-up everywhere);
- universal patch: where one untargeted patch trigger, synthesised once for all labels, sends the clean
  samples (a backdoor's target is the nearest label for every input).

The suspects are taken from the three rankings in turn, best first, until `suspects(labels)` are chosen
(a number growing with the logarithm of the labels); `REFERENCE_LABELS` more, drawn at random with the
seed from the rest, join them so that the median trigger size, which the target's is compared with, is
not the suspects' alone. docs/SCALING.md has the hit rates and costs measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from anp_onnx.bridge.importer import GatedClassifier
from anp_onnx.methods.trigger.synthesis import ANY_LABEL, TriggerSettings, predicted_labels, synthesise_trigger

SEARCH_EVERY_LABEL = 12  # up to this many labels, every label gets its trigger
REFERENCE_LABELS = 4  # labels drawn at random beside the suspects, for the median size


def suspects(labels: int) -> int:
    """How many suspects are searched among `labels`: 2 log2(labels), at least 8 (13 of 100, 20 of 1,000)."""
    return max(8, round(2 * math.log2(labels)))


def top_logits(labels: int) -> int:
    """How many of the highest logits count as a label's presence (a tenth of the labels, at least 2)."""
    return max(2, round(labels / 10))


@dataclass(frozen=True)
class Shortlist:
    """`labels`: the labels to search, suspects first; `rankings`: each signal's labels, best first (the
    first `suspects` of each), by signal name."""

    labels: list[int]
    suspects: int
    rankings: dict[str, list[int]]

    def summary(self) -> dict[str, object]:
        return {"labels": self.labels, "suspects": self.suspects, "rankings": self.rankings}


def needs_shortlist(labels: int) -> bool:
    return labels > SEARCH_EVERY_LABEL


def shortlist_labels(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    histogram: np.ndarray,
    labels: int,
    settings: TriggerSettings,
) -> Shortlist:
    """The labels to synthesise a trigger for, of calibrated `classifier`'s `labels`, from clean `x, y`, the
    perturbation's error counts `histogram` and the label search's trigger `settings` (steps, batch, seed)."""
    wanted = min(labels, suspects(labels))
    signals = {
        "perturbation": _padded(histogram, labels),
        "logits": logit_presence(classifier, x, y, labels),
        "universal_patch": universal_patch_destinations(classifier, x, y, labels, settings),
    }
    rankings = {name: _ranked(counts, settings.seed) for name, counts in signals.items()}
    chosen = interleaved(list(rankings.values()), wanted)
    rest = np.setdiff1d(np.arange(labels), chosen)
    drawn = np.random.default_rng(settings.seed).choice(rest, min(REFERENCE_LABELS, len(rest)), replace=False)
    top = {name: ranking[:wanted] for name, ranking in rankings.items()}
    return Shortlist(chosen + sorted(int(label) for label in drawn), wanted, top)


def interleaved(rankings: list[list[int]], wanted: int) -> list[int]:
    """The first `wanted` distinct labels taking each ranking's next best in turn: every signal's first
    choice, then every signal's second, and so on."""
    chosen: list[int] = []
    for rank in range(max(map(len, rankings), default=0)):
        for ranking in rankings:
            if len(chosen) < wanted and rank < len(ranking) and ranking[rank] not in chosen:
                chosen.append(ranking[rank])
    return chosen


def logit_presence(
    classifier: GatedClassifier, x: torch.Tensor, y: torch.Tensor, labels: int, batch_size: int = 256
) -> np.ndarray:
    """For each label, how many clean samples of other labels have it among their `top_logits` highest logits."""
    k = min(labels, top_logits(labels) + 1)  # one more: a sample's own label is often among them
    counts = torch.zeros(labels, dtype=torch.int64)
    classifier.eval()
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            top = classifier(batch).reshape(len(batch), -1).topk(k, dim=1).indices.cpu()
            own = y[start : start + batch_size].cpu()[:, None]
            others = top[top != own.expand_as(top)]
            counts += torch.bincount(others, minlength=labels)[:labels]
    return counts.numpy()


def universal_patch_destinations(
    classifier: GatedClassifier, x: torch.Tensor, y: torch.Tensor, labels: int, settings: TriggerSettings
) -> np.ndarray:
    """Where one untargeted patch trigger sends the clean samples it moves off their label: the count per label."""
    trigger = synthesise_trigger(classifier, x, y, ANY_LABEL, settings)
    classifier.eval()
    predicted = predicted_labels(classifier, trigger.stamp(x)).cpu()
    moved = predicted[predicted != y.cpu()]
    return torch.bincount(moved, minlength=labels)[:labels].numpy()


def _padded(histogram: np.ndarray, labels: int) -> np.ndarray:
    return np.pad(histogram, (0, max(0, labels - len(histogram))))[:labels]


def _ranked(counts: np.ndarray, seed: int) -> list[int]:
    """Labels by count, highest first; ties in an order drawn with `seed` (not the label order)."""
    tie_break = np.random.default_rng(seed).permutation(len(counts))
    return [int(label) for label in np.lexsort((tie_break, -np.asarray(counts)))]
