"""PNG figures for a person: the distribution of mask values, and ACC / ASR against the pruning
threshold. matplotlib's object API with the Agg canvas: no display, no global pyplot state."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from anp_onnx.prune import MaskValues
from anp_onnx.rewrite import write_atomically
from anp_onnx.sweep import SweepPoint

FIGURE_SIZE = (6.4, 4.4)
DPI = 100


def plot_mask_distribution(masks: MaskValues, cut: float | None, path: Path, title: str = "") -> None:
    """Histogram of every neuron's mask value, with the pruning cut as a vertical line."""
    values = np.concatenate([np.asarray(layer_masks, dtype=np.float64) for layer_masks in masks.masks.values()])
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    axes = figure.add_subplot()
    axes.hist(values, bins=np.linspace(0, 1, 41), color="#4c72b0", edgecolor="white")
    if cut is not None:
        pruned = int((values < cut).sum())
        axes.axvline(cut, color="#c44e52", linestyle="--", label=f"pruned below {cut:.3g}: {pruned} of {len(values)}")
        axes.legend(loc="upper center")
    axes.set_xlim(0, 1)
    axes.set_xlabel("mask value")
    axes.set_ylabel("neurons")
    axes.set_title(title or "Mask values after optimisation")
    _save(figure, path)


def plot_threshold_sweep(
    points: Sequence[SweepPoint], path: Path, chosen: float | None = None, title: str = "", acc_label: str = "ACC"
) -> None:
    """ACC and ASR (where measured) of the model pruned at each threshold, in percent."""
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    axes = figure.add_subplot()
    thresholds = [point.threshold for point in points]
    for name, values, style in (
        (acc_label, [point.acc for point in points], {"color": "#4c72b0", "marker": "o"}),
        ("ASR", [point.asr for point in points], {"color": "#c44e52", "marker": "s"}),
    ):
        if all(value is not None for value in values):
            axes.plot(thresholds, [100 * value for value in values], label=name, **style)
    if chosen is not None:
        axes.axvline(chosen, color="grey", linestyle=":", label=f"chosen threshold {chosen:g}")
    axes.set_xlim(min(thresholds) - 0.03, max(thresholds) + 0.03)
    secondary = axes.twiny()
    secondary.set_xlim(axes.get_xlim())
    secondary.set_xticks(thresholds)
    secondary.set_xticklabels([str(point.pruned) for point in points], fontsize=7)
    secondary.set_xlabel("neurons pruned", fontsize=8)
    axes.set_xticks(thresholds)
    axes.set_ylim(-2, 102)
    axes.set_xlabel("pruning threshold (masks below it are pruned)")
    axes.set_ylabel("percent")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path)


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
