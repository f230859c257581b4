"""Which label adversarial neuron perturbations push clean inputs onto: a backdoored model's errors
under them land mostly on the attacker's target (Wu & Wang's observation), a clean model's spread out."""

from __future__ import annotations

import numpy as np
import torch

from anp_onnx import anp
from anp_onnx.importer import GatedClassifier


def perturbation_errors(
    classifier: GatedClassifier, x: torch.Tensor, y: torch.Tensor, eps: float, rounds: int, seed: int
) -> tuple[np.ndarray, int]:
    """Where adversarial neuron perturbations send the clean samples they misclassify: the count per
    predicted label over `rounds` perturbations (a fresh random start each), and the number of errors.
    The classifier must be calibrated (`anp.calibrate`)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noises = anp.noise_parameters(classifier)
    histogram = np.zeros(1, dtype=np.int64)
    errors = 0
    with anp.optimisation_mode(classifier):
        for _ in range(rounds):
            anp.adversarial_noise(classifier, x, y, noises, eps, generator)
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


def _add(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    size = max(len(left), len(right))
    return np.pad(left, (0, size - len(left))) + np.pad(right, (0, size - len(right)))
