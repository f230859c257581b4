import numpy as np

from anp_onnx.prune import (
    MaskValues,
    PruningPlan,
    by_accuracy_budget,
    by_count,
    by_fraction,
    by_threshold,
    within_budget,
)

VALUES = MaskValues(
    masks={"a": np.array([0.9, 0.05, 0.5]), "b": np.array([0.1, 1.0, 0.3, 0.15])},
    pruned_values={"a": np.array([1.0, 2.0, 3.0]), "b": np.array([4.0, 5.0, 6.0, 7.0])},
)


def pairs(plan: PruningPlan) -> list[tuple[str, int]]:
    return [(neuron.layer, neuron.channel) for neuron in plan.neurons]


def test_threshold_prunes_masks_below_it_smallest_first():
    assert pairs(by_threshold(VALUES, 0.2)) == [("a", 1), ("b", 0), ("b", 3)]


def test_count_and_fraction_take_the_smallest_masks():
    assert pairs(by_count(VALUES, 2)) == [("a", 1), ("b", 0)]
    assert pairs(by_fraction(VALUES, 0.5)) == pairs(by_count(VALUES, 4))


def test_each_pruned_neuron_carries_its_mask_and_constant_output():
    first = by_count(VALUES, 1).neurons[0]
    assert (first.mask, first.value) == (0.05, 2.0)


def test_accuracy_budget_takes_the_most_neurons_within_the_drop():
    accuracy_by_count = {0: 0.90, 1: 0.90, 2: 0.89, 3: 0.86, 4: 0.80, 5: 0.70, 6: 0.5, 7: 0.4}
    seen = []

    def accuracy_of(plan: PruningPlan) -> float:
        seen.append(len(plan.neurons))
        return accuracy_by_count[len(plan.neurons)]

    plan = by_accuracy_budget(VALUES, 0.02, accuracy_of, max_fraction=1.0)
    assert pairs(plan) == pairs(by_count(VALUES, 2))
    assert seen == [0, 1, 2, 3, 4, 5, 6, 7]
    assert pairs(by_accuracy_budget(VALUES, 0.0, accuracy_of, max_fraction=1.0)) == pairs(by_count(VALUES, 1))


def test_a_drop_of_exactly_the_budget_is_within_it_despite_float_rounding():
    assert 0.916 - 0.886 > 0.03  # what the float subtraction gives
    assert within_budget(0.916 - 0.886, 0.03)
    assert not within_budget(0.916 - 0.884, 0.03)
    accuracy_by_count = {0: 0.916, 1: 0.886, 2: 0.884}

    def accuracy_of(plan: PruningPlan) -> float:
        return accuracy_by_count.get(len(plan.neurons), 0.0)

    plan = by_accuracy_budget(VALUES, 0.03, accuracy_of, max_fraction=1.0)
    assert pairs(plan) == pairs(by_count(VALUES, 1))
