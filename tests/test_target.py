"""How the scan weighs its two signals (anp_onnx.methods.trigger.target.weigh_evidence): the trigger sizes shortlist
the labels, the perturbation's errors pick among them, and the score is the stronger signal."""

import numpy as np
import pytest

from anp_onnx.methods.trigger.target import SIZE_TIE, weigh_evidence


def test_the_smallest_trigger_names_the_target_even_when_the_perturbation_points_elsewhere():
    evidence = weigh_evidence(np.array([0, 10, 90]), [20.0, 100.0, 80.0, 120.0])
    assert evidence.label == 0
    assert evidence.share == 0.0 and evidence.size_ratio == pytest.approx(20 / 90)


def test_sizes_within_the_tie_of_the_smallest_are_decided_by_the_perturbation():
    nearly_smallest = 62.0 * (1 + SIZE_TIE / 2)
    evidence = weigh_evidence(np.array([5, 0, 80, 15]), [62.0, 110.0, nearly_smallest, 100.0])
    assert evidence.label == 2 and evidence.share == 0.8


def test_the_score_is_the_stronger_of_the_share_and_how_far_below_the_median_the_trigger_is():
    perturbation_speaks = weigh_evidence(np.array([90, 5, 5]), [80.0, 100.0, 100.0])
    assert perturbation_speaks.score == pytest.approx(0.9)
    trigger_speaks = weigh_evidence(np.array([1, 50, 49]), [30.0, 100.0, 100.0])
    assert trigger_speaks.label == 0 and trigger_speaks.score == pytest.approx(0.7)
    even = weigh_evidence(np.array([4, 3, 3]), [100.0, 100.0, 100.0])
    assert even.score == pytest.approx(0.4)


def test_a_histogram_shorter_than_the_labels_and_no_errors_at_all_are_handled():
    assert weigh_evidence(np.array([3]), [50.0, 10.0, 60.0]).label == 1
    silent = weigh_evidence(np.zeros(1, dtype=np.int64), [10.0, 50.0, 60.0])
    assert silent.label == 0 and silent.share == 0.0 and silent.score == pytest.approx(0.8)
