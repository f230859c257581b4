"""The PNGs: real files, whole, with the lines and bars the data calls for (checked by their colours)."""

from __future__ import annotations

import numpy as np
from matplotlib.image import imread

from anp_onnx.prune import MaskValues
from anp_onnx.report.plots import plot_mask_distribution, plot_threshold_sweep
from anp_onnx.validate.sweep import SweepPoint

BLUE, RED = (0x4C, 0x72, 0xB0), (0xC4, 0x4E, 0x52)


def pixels_of(path, colour: tuple[int, int, int]) -> int:
    image = (imread(path)[..., :3] * 255).round()
    return int((np.abs(image - np.array(colour)).max(axis=-1) <= 2).sum())


def masks() -> MaskValues:
    rng = np.random.default_rng(0)
    values = {"conv": rng.random(40).astype(np.float32), "fc": np.r_[np.zeros(5), np.ones(15)].astype(np.float32)}
    return MaskValues(values, {name: np.zeros(len(mask)) for name, mask in values.items()})


def test_the_mask_histogram_draws_bars_and_the_cut_only_when_there_is_one(tmp_path):
    with_cut, without = tmp_path / "cut.png", tmp_path / "plain.png"
    plot_mask_distribution(masks(), 0.2, with_cut, title="model")
    plot_mask_distribution(masks(), None, without)
    assert with_cut.read_bytes().startswith(b"\x89PNG")
    assert pixels_of(with_cut, BLUE) > 500 and pixels_of(without, BLUE) > 500
    assert pixels_of(with_cut, RED) > 50 and pixels_of(without, RED) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cut.png", "plain.png"]


def test_the_sweep_draws_asr_only_where_it_was_measured(tmp_path):
    thresholds = [round(0.1 * step, 1) for step in range(10)]
    measured = [SweepPoint(t, int(100 * t), 0.9 - 0.5 * t, max(0.0, 1 - 2 * t)) for t in thresholds]
    clean_only = [SweepPoint(t, int(100 * t), 0.9 - 0.5 * t, None) for t in thresholds]
    both, acc_only = tmp_path / "both.png", tmp_path / "acc.png"
    plot_threshold_sweep(measured, both, chosen=0.2, title="model")
    plot_threshold_sweep(clean_only, acc_only)
    assert imread(both).shape[:2] == (440, 640)
    assert pixels_of(both, BLUE) > 200 and pixels_of(acc_only, BLUE) > 200
    assert pixels_of(both, RED) > 200 and pixels_of(acc_only, RED) == 0
