"""PNG figures for a person: the distribution of mask values, and ACC / ASR against the pruning
threshold. matplotlib's object API with the Agg canvas: no display, no global pyplot state."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from anp_onnx.data import is_channels_last
from anp_onnx.onnx.rewrite import write_atomically
from anp_onnx.prune import MaskValues
from anp_onnx.validate.sweep import SweepPoint

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
    _plot_acc_and_asr(axes, thresholds, points, acc_label)
    if chosen is not None:
        axes.axvline(chosen, color="grey", linestyle=":", label=f"chosen threshold {chosen:g}")
    axes.set_xlim(min(thresholds) - 0.03, max(thresholds) + 0.03)
    secondary = axes.twiny()
    secondary.set_xlim(axes.get_xlim())
    secondary.set_xticks(thresholds)
    secondary.set_xticklabels([str(point.pruned) for point in points], fontsize=7)
    secondary.set_xlabel("neurons pruned", fontsize=8)
    axes.set_xticks(thresholds)
    _finish_percent_plot(figure, axes, "pruning threshold (masks below it are pruned)", title, path, columns=3)


def plot_trigger(mask: np.ndarray, pattern: np.ndarray, example: np.ndarray, path: Path, title: str = "") -> None:
    """The synthesised trigger as a person sees it: its mask, its pattern, and a clean image stamped
    with it. Arrays as the model takes one input (CHW, HWC or flat); flat inputs are shown as a row."""
    stamped = (1 - mask) * example + mask * pattern
    figure = Figure(figsize=(9.6, 3.6), dpi=DPI)
    for position, (name, image) in enumerate(
        (("mask", np.broadcast_to(mask, example.shape)), ("pattern", pattern), ("clean image, stamped", stamped)),
        start=1,
    ):
        axes = figure.add_subplot(1, 3, position)
        shown = _as_image(np.asarray(image, dtype=np.float64))
        axes.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=max(1.0, float(shown.max())))
        axes.set_title(name, fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path)


def _as_image(values: np.ndarray) -> np.ndarray:
    """HxW (one channel) or HxWx3 for imshow, from CHW, HWC or a flat vector."""
    if values.ndim == 1:
        return values[None, :]
    if values.ndim == 3 and not is_channels_last((1, *values.shape)):  # one sample of a batch
        values = values.transpose(1, 2, 0)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    return np.clip(values, 0, None)


def plot_pruning_rounds(
    points: Sequence[SweepPoint],
    decided: Sequence[tuple[float, float]],
    path: Path,
    title: str = "",
    acc_label: str = "ACC",
) -> None:
    """Trigger-guided pruning round by round: the measured ACC / ASR of each prefix of the plan
    (solid), and the clean-data figures that decided it (dashed, `decided[k]` after k neurons: ACC
    on --data, synthetic trigger ASR)."""
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    axes = figure.add_subplot()
    counts = [point.pruned for point in points]
    _plot_acc_and_asr(axes, counts, points, acc_label)
    steps = list(range(len(decided)))
    decided_acc = [100 * acc for acc, _ in decided]
    axes.plot(steps, decided_acc, color="#4c72b0", linestyle="--", label="ACC on --data (decides)")
    decided_asr = [100 * asr for _, asr in decided]
    axes.plot(steps, decided_asr, color="#dd8452", linestyle="--", marker="^", label="synthetic trigger ASR (decides)")
    axes.set_xticks(counts)
    _finish_percent_plot(figure, axes, "neurons pruned, in the order chosen", title, path, columns=2)


def plot_repair(
    checks: Sequence[dict[str, float]],
    written: tuple[float | None, float | None],
    path: Path,
    title: str = "",
    acc_label: str = "ACC",
    note: str = "",
) -> None:
    """The repair stage step by step: held-out clean ACC and the refitted synthetic trigger's ASR at each
    check (what decided), and the written model's measured ACC / ASR as horizontal lines. With no
    checks (repair did not run), `note` says why."""
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    axes = figure.add_subplot()
    steps = [check["step"] for check in checks]
    if checks:
        held_out = [100 * check["clean_accuracy"] for check in checks]
        refitted = [100 * check["residual_asr"] for check in checks]
        axes.plot(steps, held_out, color="#4c72b0", linestyle="--", marker="o", label="held-out ACC (decides)")
        axes.plot(steps, refitted, color="#dd8452", linestyle="--", marker="^", label="refitted trigger ASR (decides)")
    acc, asr = written
    if acc is not None:
        axes.axhline(100 * acc, color="#4c72b0", label=f"written model: {acc_label}")
    if asr is not None:
        axes.axhline(100 * asr, color="#c44e52", label="written model: ASR")
    if note:
        axes.text(0.5, 0.5, note, transform=axes.transAxes, ha="center", va="center", fontsize=9, wrap=True)
    _finish_percent_plot(figure, axes, "repair steps", title, path, columns=2)


def _plot_acc_and_asr(axes, positions: Sequence[float], points: Sequence[SweepPoint], acc_label: str) -> None:
    """The measured ACC and ASR of `points` in percent, each line only where every point has it."""
    for name, values, style in (
        (acc_label, [point.acc for point in points], {"color": "#4c72b0", "marker": "o"}),
        ("ASR", [point.asr for point in points], {"color": "#c44e52", "marker": "s"}),
    ):
        if all(value is not None for value in values):
            axes.plot(positions, [100 * value for value in values], label=name, **style)


def _finish_percent_plot(figure: Figure, axes, xlabel: str, title: str, path: Path, columns: int) -> None:
    """Percent on 0-100, a grid, the legend under the axes, the title, and the file written."""
    axes.set_ylim(-2, 102)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("percent")
    axes.grid(alpha=0.3)
    offset = -0.16 if columns == 3 else -0.14
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, offset), ncol=columns, fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path)


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
