"""Pruning plans: which neurons to prune, decided from the mask values, and what each then outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.2  # the paper's: prune masks below it


@dataclass(frozen=True)
class PrunedNeuron:
    layer: str
    channel: int
    mask: float
    value: float  # the constant the channel outputs once pruned


@dataclass(frozen=True)
class PruningPlan:
    """The decision, inspectable and serialisable; `rewrite.py` carries it out."""

    criterion: str
    neurons: tuple[PrunedNeuron, ...]

    def channels_of(self, layer: str) -> list[int]:
        return [neuron.channel for neuron in self.neurons if neuron.layer == layer]


@dataclass(frozen=True)
class MaskValues:
    """Optimised masks and pruned values per layer, in neuron-map order."""

    masks: dict[str, np.ndarray]
    pruned_values: dict[str, np.ndarray]

    def ranked(self) -> list[PrunedNeuron]:
        """All neurons, smallest mask first (ties: graph order)."""
        neurons = [
            PrunedNeuron(layer, channel, float(mask[channel]), float(self.pruned_values[layer][channel]))
            for layer, mask in self.masks.items()
            for channel in range(len(mask))
        ]
        order = sorted(range(len(neurons)), key=lambda index: (neurons[index].mask, index))
        return [neurons[index] for index in order]

    @property
    def total(self) -> int:
        return sum(len(mask) for mask in self.masks.values())


def by_threshold(values: MaskValues, threshold: float) -> PruningPlan:
    """Prune every neuron whose mask is below `threshold` (the paper uses 0.2)."""
    chosen = tuple(neuron for neuron in values.ranked() if neuron.mask < threshold)
    return PruningPlan(f"threshold<{threshold:g}", chosen)


def by_count(values: MaskValues, count: int) -> PruningPlan:
    """Prune the `count` neurons with the smallest masks."""
    return PruningPlan(f"count={count}", tuple(values.ranked()[: max(0, count)]))


def by_fraction(values: MaskValues, fraction: float) -> PruningPlan:
    """Prune the given share of all neurons, smallest masks first."""
    count = round(fraction * values.total)
    return PruningPlan(f"fraction={fraction:g}", by_count(values, count).neurons)


def within_budget(drop: float, budget: float) -> bool:
    """Whether a share of a sample count (an accuracy drop, an ASR) stays within its budget; a value of
    exactly the budget (0.916 - 0.886 against 0.03) must not fail on float rounding."""
    return drop <= budget + 1e-9


def by_accuracy_budget(
    values: MaskValues,
    max_drop: float,
    accuracy_of: Callable[[PruningPlan], float],
    max_fraction: float = 0.5,
) -> PruningPlan:
    """The most neurons (smallest masks first, counts on a grid of 1% of all neurons, up to
    `max_fraction`) whose held-out clean accuracy stays within `max_drop` of the unpruned model's."""
    ranked = values.ranked()
    baseline = accuracy_of(PruningPlan("none", ()))
    step = max(1, values.total // 100)
    chosen = 0
    for count in range(step, int(values.total * max_fraction) + 1, step):
        if within_budget(baseline - accuracy_of(PruningPlan(f"count={count}", tuple(ranked[:count]))), max_drop):
            chosen = count
    return PruningPlan(f"max-acc-drop={max_drop:g}", tuple(ranked[:chosen]))
