"""The threshold sweep measures each pruned variant as the rewritten ONNX file really behaves."""

from __future__ import annotations

import numpy as np
import pytest

from anp_onnx import prune
from anp_onnx.data import Samples, load_samples
from anp_onnx.methods.anp import AnpSettings
from anp_onnx.methods.settings import AnpMethodSettings
from anp_onnx.onnx.model import input_shape, load_model
from anp_onnx.onnx.rewrite import apply_plan, save_model
from anp_onnx.pipeline.purify import PruningChoice, purify
from anp_onnx.report.json_report import purify_report
from anp_onnx.validate.evaluate import Evaluator
from anp_onnx.validate.sweep import DEFAULT_THRESHOLDS, threshold_sweep
from tools.report_masks import masks_from_report


@pytest.fixture(scope="module")
def purified(tmp_path_factory, models, image_samples):
    folder = tmp_path_factory.mktemp("sweep")
    data = np.load(image_samples)
    poison = folder / "poison.npz"
    np.savez(poison, x=data["x"][:24], y=np.zeros(24, dtype=np.int64))
    result = purify(
        models["batchnorm"],
        image_samples,
        folder / "out.onnx",
        test_data=image_samples,
        poison_data=poison,
        method="anp",
        settings=AnpMethodSettings(AnpSettings(iterations=5, batch_size=16), PruningChoice(threshold=0.5)),
        device="cpu",
    )
    shape = input_shape(load_model(models["batchnorm"]))
    return result, load_samples(image_samples, shape), load_samples(poison, shape)


def sweep(result, clean: Samples, poison: Samples | None, thresholds=DEFAULT_THRESHOLDS):
    model = load_model(result.model)
    return threshold_sweep(model, result.neuron_map, result.masks, clean, poison, thresholds, device="cpu")


def test_the_point_at_the_chosen_threshold_is_what_purify_wrote(purified):
    result, clean, poison = purified
    points = sweep(result, clean, poison, (0.0, 0.5, 1.01))
    unpruned, chosen, everything = points
    assert (chosen.acc, chosen.asr) == (result.after.acc, result.after.asr)
    assert chosen.pruned == len(result.plan.neurons)
    assert unpruned.pruned == 0 and (unpruned.acc, unpruned.asr) == (result.before.acc, result.before.asr)
    assert everything.pruned == result.neuron_map.total_neurons


def test_more_threshold_prunes_more_and_each_point_matches_its_own_file(purified, tmp_path):
    result, clean, _ = purified
    points = sweep(result, clean, None)
    assert [point.threshold for point in points] == [round(0.1 * step, 1) for step in range(10)]
    assert [point.pruned for point in points] == sorted(point.pruned for point in points)
    assert all(point.asr is None for point in points)
    middle = points[5]
    path = tmp_path / "variant.onnx"
    save_model(apply_plan(load_model(result.model), result.neuron_map, prune.by_threshold(result.masks, 0.5)), path)
    assert Evaluator(path, "cpu").accuracy(clean) == middle.acc


def test_masks_read_back_from_a_report_give_the_same_plan(purified):
    result = purified[0]
    values = masks_from_report(purify_report(result))
    again = prune.by_threshold(values, 0.5)
    assert [(n.layer, n.channel) for n in again.neurons] == [(n.layer, n.channel) for n in result.plan.neurons]
    assert [n.value for n in again.neurons] == pytest.approx([n.value for n in result.plan.neurons])
