"""How the scan weighs its two signals (anp_onnx.methods.trigger.target.weigh_evidence): the trigger sizes shortlist
the labels, the perturbation's errors pick among them or name a label that takes most of them, and the score is
the stronger signal."""

import numpy as np
import pytest
import torch

from anp_onnx.methods.trigger.synthesis import Trigger
from anp_onnx.methods.trigger.target import SIZE_TIE, TargetSearch, weigh_evidence


def _patch(label: int, size: float, success: float = 1.0) -> Trigger:
    return Trigger("patch", label, torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), success, size)


def test_the_smallest_trigger_names_the_target_when_the_perturbation_points_elsewhere_without_dominating():
    evidence = weigh_evidence(np.array([0, 45, 55]), [20.0, 100.0, 80.0, 120.0])
    assert evidence.label == 0 and evidence.candidates == (0,)
    assert evidence.share == 0.0 and evidence.size_ratio == pytest.approx(20 / 90)


def test_a_label_taking_most_of_the_perturbations_errors_is_named_whatever_its_trigger_size():
    # badnets_mobilenet_bn of 2026-12-07: 80% of the errors on target 4, whose trigger was not the smallest
    histogram = np.array([10, 20, 30, 40, 1133, 50, 33, 50, 40, 10])
    sizes = [70.0, 77.0, 66.0, 90.0, 88.0, 88.0, 81.0, 116.0, 95.0, 98.0]
    evidence = weigh_evidence(histogram, sizes)
    assert evidence.label == 4 and evidence.candidates == (4,)
    assert evidence.score == pytest.approx(1133 / 1416)


def test_a_dominant_share_gives_way_to_a_trigger_that_speaks_louder():
    evidence = weigh_evidence(np.array([0, 35, 65]), [10.0, 100.0, 80.0, 120.0])
    assert evidence.label == 0 and evidence.score == pytest.approx(1 - 10 / 90)


def test_sizes_within_the_tie_of_the_smallest_are_decided_by_the_perturbation():
    nearly_smallest = 62.0 * (1 + SIZE_TIE / 2)
    evidence = weigh_evidence(np.array([5, 0, 80, 15]), [62.0, 110.0, nearly_smallest, 100.0])
    assert evidence.label == 2 and evidence.share == 0.8
    assert evidence.candidates == (0, 2)


def test_naming_another_candidate_weighs_the_same_signals_for_it():
    histogram = np.array([5, 0, 40, 15])
    triggers = [_patch(label, size) for label, size in enumerate([62.0, 110.0, 63.0, 100.0])]
    search = TargetSearch(weigh_evidence(histogram, [t.size for t in triggers]), histogram, 60, triggers, 0.5)
    assert search.evidence.label == 2
    renamed = search.naming(0)
    assert renamed.evidence.label == 0 and renamed.evidence.share == pytest.approx(5 / 60)
    assert renamed.evidence.size_ratio == pytest.approx(62 / 81.5)
    assert renamed.evidence.score == pytest.approx(1 - 62 / 81.5)
    assert renamed.evidence.candidates == (0, 2) and renamed.histogram is histogram


def test_the_score_is_the_stronger_of_the_share_and_how_far_below_the_median_the_trigger_is():
    perturbation_speaks = weigh_evidence(np.array([90, 5, 5]), [80.0, 100.0, 100.0])
    assert perturbation_speaks.score == pytest.approx(0.9)
    trigger_speaks = weigh_evidence(np.array([1, 50, 49]), [30.0, 100.0, 100.0])
    assert trigger_speaks.label == 0 and trigger_speaks.score == pytest.approx(0.7)
    even = weigh_evidence(np.array([4, 3, 3]), [100.0, 100.0, 100.0])
    assert even.score == pytest.approx(0.4)


def test_a_histogram_shorter_than_the_labels_and_no_errors_at_all_are_handled():
    assert weigh_evidence(np.array([1, 1]), [50.0, 10.0, 60.0]).label == 1
    silent = weigh_evidence(np.zeros(1, dtype=np.int64), [10.0, 50.0, 60.0])
    assert silent.label == 0 and silent.share == 0.0 and silent.score == pytest.approx(0.8)
