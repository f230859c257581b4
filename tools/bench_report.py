"""The defence benchmark's write-up: detection statistics, the Markdown tables of docs/RESULTS.md and the JSON.

Kept apart from ``tools/bench_defense.py`` (which measures) so the numbers and their layout can be
checked on their own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

METHODS = ("guided", "anp", "fp", "clp")
METHOD_TITLES = {"guided": "anp-onnx", "anp": "ANP masks", "fp": "Fine-Pruning", "clp": "CLP"}
DEFAULT_METHODS = ("guided", "fp", "clp")  # `make bench`; the paper's masks ("anp") on request: 4 min a cell


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """Area under the ROC curve of scores separating `positive` from `negative` (Mann-Whitney: the share of
    pairs a positive outscores a negative, ties counting half); None when a side is empty."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def scan_summary(cells: Sequence[dict], clean: Sequence[dict]) -> dict[str, object]:
    """AUROC of the scan score (backdoored vs clean) and how often the suspected target is the true one."""
    backdoored = [cell for cell in cells if cell.get("scan")]
    controls = [model for model in clean if model.get("scan")]
    hits = [cell["scan"]["suspected_target"] == cell["target"] for cell in backdoored]
    return {
        "auroc": auroc([c["scan"]["score"] for c in backdoored], [m["scan"]["score"] for m in controls]),
        "target_hit_rate": sum(hits) / len(hits) if hits else None,
        "backdoored_models": len(backdoored),
        "clean_models": len(controls),
    }


def method_summary(cells: Sequence[dict]) -> dict[str, dict[str, float | int]]:
    """Per method over the cells it ran on: mean ACC drop (points), mean ASR after, worst cell of each."""
    summary = {}
    for method in METHODS:
        ran = [cell for cell in cells if cell.get(method)]
        if not ran:
            continue
        drops = [100 * (cell["before"]["acc"] - cell[method]["acc"]) for cell in ran]
        asrs = [100 * cell[method]["asr"] for cell in ran]
        summary[method] = {
            "cells": len(ran),
            "mean_acc_drop_points": round(sum(drops) / len(ran), 2),
            "max_acc_drop_points": round(max(drops), 2),
            "mean_asr_percent": round(sum(asrs) / len(ran), 2),
            "max_asr_percent": round(max(asrs), 2),
            "cells_meeting_targets": sum(d <= 3 and a <= 5 for d, a in zip(drops, asrs, strict=True)),
        }
    return summary


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _pair(result: dict | None) -> list[str]:
    return [_pct(result["acc"]), _pct(result["asr"])] if result else ["–", "–"]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


NO_CELLS = "No backdoored model measured (yet)."


def defence_table(cells: Sequence[dict]) -> list[str]:
    """The paper's Table 1 layout: per model ACC / ASR with no defence and after each method."""
    if not cells:
        return [NO_CELLS]
    header = ["model", "attack", "export", "target", "No defence ACC", "ASR"]
    for method in METHODS:
        header += [f"{METHOD_TITLES[method]} ACC", "ASR"]
    lines = [_row(header), _row(["---"] * 4 + ["---:"] * (len(header) - 4))]
    for cell in cells:
        row = [cell["arch"], cell["attack"], cell["export"], str(cell["target"]), *_pair(cell["before"])]
        for method in METHODS:
            row += _pair(cell.get(method))
        lines.append(_row(row))
    summary = method_summary(cells)
    average = ["**average**", "", "", "", _pct(_mean(c["before"]["acc"] for c in cells)), ""]
    average[-1] = _pct(_mean(c["before"]["asr"] for c in cells))
    for method in METHODS:
        if method in summary:
            stats = summary[method]
            average += [f"drop {stats['mean_acc_drop_points']:.2f}", f"{stats['mean_asr_percent']:.2f}"]
        else:
            average += ["–", "–"]
    lines.append(_row(average))
    return lines


def pruning_table(cells: Sequence[dict]) -> list[str]:
    """How many neurons each method pruned, and the wall time of each step."""
    if not cells:
        return [NO_CELLS]
    header = ["model", "neurons", *(f"{METHOD_TITLES[m]} pruned" for m in METHODS)]
    header += [*(f"{METHOD_TITLES[m]} s" for m in METHODS), "scan s", "cell s"]
    lines = [_row(header), _row(["---"] + ["---:"] * (len(header) - 1))]
    for cell in cells:
        row = [cell["name"], str(cell["neurons"])]
        row += [str(cell[m]["pruned"]) if cell.get(m) else "–" for m in METHODS]
        row += [f"{cell[m]['seconds']:.1f}" if cell.get(m) else "–" for m in METHODS]
        row += [f"{cell['scan']['seconds']:.1f}" if cell.get("scan") else "–", f"{cell['seconds']:.1f}"]
        lines.append(_row(row))
    return lines


def scan_table(cells: Sequence[dict], clean: Sequence[dict]) -> list[str]:
    header = ["model", "backdoored", "true target", "score", "suspected target", "hit"]
    header += ["its share of perturbation errors", "its trigger / median", "perturbation alone names"]
    lines = [_row(header), _row(["---", "---", "---:", "---:", "---:", "---", "---:", "---:", "---:"])]
    for model in [*cells, *clean]:
        scan = model.get("scan")
        if not scan:
            continue
        backdoored = model["attack"] is not None
        hit = ("yes" if scan["suspected_target"] == model["target"] else "no") if backdoored else ""
        target = str(model["target"]) if backdoored else ""
        row = [model["name"], "yes" if backdoored else "no", target, f"{scan['score']:.3f}"]
        row += [str(scan["suspected_target"]), hit, _pct(scan.get("target_share"))]
        row += [_ratio(scan.get("size_ratio")), str(scan.get("perturbation_target", "–"))]
        lines.append(_row(row))
    return lines


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def comparison_lines(summary: dict[str, dict]) -> list[str]:
    """Issue 3's acceptance, said plainly: does anp-onnx (its default, and the paper's masks where they
    ran) beat each baseline on mean ASR at an equal or smaller mean ACC drop?"""
    lines = []
    for method in ("guided", "anp"):
        if method not in summary:
            continue
        ours = summary[method]
        for baseline in ("fp", "clp"):
            if baseline not in summary:
                continue
            other = summary[baseline]
            lower_asr = ours["mean_asr_percent"] < other["mean_asr_percent"]
            no_worse_acc = ours["mean_acc_drop_points"] <= other["mean_acc_drop_points"]
            verdict = "beats" if lower_asr and no_worse_acc else "does **not** beat"
            lines.append(
                f"- {METHOD_TITLES[method]} {verdict} {METHOD_TITLES[baseline]}: mean ASR "
                f"{ours['mean_asr_percent']:.2f}% vs {other['mean_asr_percent']:.2f}%, mean ACC drop "
                f"{ours['mean_acc_drop_points']:.2f} vs {other['mean_acc_drop_points']:.2f} points."
            )
    return lines


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def results_markdown(results: dict) -> str:
    """docs/RESULTS.md from the results JSON."""
    cells, clean = results["cells"], results["clean_models"]
    settings = results["settings"]
    lines = [
        "# Defence benchmark results",
        "",
        f"Written by `{results['command']}` (`make bench` runs the full grid) on {results['machine']}, "
        f"{results['finished']}. Fashion-MNIST models from `tools/bench_grid.py`, each trained once by "
        f"`tools/train_backdoor.py` ({settings['epochs']} epochs) and cached under `cache/bench/` (the "
        "bundled `examples/` where the recipe is the same). ACC on the 2 000 clean test images of each "
        "model's `test.npz`, ASR on its 2 000 triggered non-target test images (`poison.npz`); every "
        "defence decides from the 500 clean training images of `clean.npz` only (CLP from the weights "
        "only), and every pruned model is written by the same rewriter and measured with onnxruntime. "
        "Numbers in percent.",
        "",
        "## Settings",
        "",
        f"- **anp-onnx**: `anp_onnx.pipeline.purify.purify` with the package defaults ({settings['guided_note']}).",
        f"- **ANP masks**: the same with `method='anp'`, the paper's loop and threshold ({settings['anp_note']}).",
        f"- **Fine-Pruning** (pruning only): {settings['fp_note']}",
        f"- **CLP**: {settings['clp_note']}",
        f"- **scan**: `anp_onnx.pipeline.scan.scan` with its defaults, on each model's 500 clean images"
        f"{_scan_source(results)}.",
        "",
        "## ACC / ASR before and after each defence",
        "",
        *defence_table(cells),
        "",
        "The last row: the mean ACC and ASR with no defence, then for each method the mean ACC drop "
        "(points) and the mean ASR after. Per method:",
        "",
    ]
    for method, stats in results["summary"].items():
        lines.append(
            f"- {METHOD_TITLES[method]}: {stats['cells']} cells, mean ACC drop {stats['mean_acc_drop_points']:.2f} "
            f"points (worst {stats['max_acc_drop_points']:.2f}), mean ASR {stats['mean_asr_percent']:.2f}% "
            f"(worst {stats['max_asr_percent']:.2f}%); {stats['cells_meeting_targets']} of {stats['cells']} cells "
            "within issue 3's targets (ASR <= 5%, ACC drop <= 3 points)."
        )
    lines += comparison_lines(results["summary"])
    not_run = [METHOD_TITLES[m] for m in METHODS if m not in results["summary"]]
    if not_run:
        lines.append(f"- Not run in this invocation: {', '.join(not_run)} (`--methods`).")
    lines += ["", "## Neurons pruned and wall time per cell", "", *pruning_table(cells), ""]
    scan = results["scan_summary"]
    lines += ["## Trigger-free scan (issue 5)", ""]
    if scan["auroc"] is not None:
        lines.append(
            f"Detection AUROC (backdoored vs clean, by score) **{scan['auroc']:.3f}** over "
            f"{scan['backdoored_models']} backdoored and {scan['clean_models']} clean models; "
            f"target-label hit rate **{100 * scan['target_hit_rate']:.1f}%** of the backdoored models."
        )
    else:
        lines.append("No AUROC: this invocation scanned no backdoored or no clean model.")
    lines += [
        "",
        "Suspected target: the label whose synthesised patch trigger is smallest, the perturbation's errors "
        "deciding between labels whose sizes are within 5% of it; score: the larger of that label's share of "
        "the errors under adversarial neuron perturbations and of one minus its trigger's size over the "
        "median label's (`anp_onnx.methods.trigger.target.weigh_evidence`). The last column is the label the "
        "perturbation alone would name (the scan before the triggers).",
        "",
        *scan_table(cells, clean),
        "",
    ]
    if results.get("plot"):
        plot = results["plot"]
        lines += [
            "## ACC and ASR against the pruning threshold",
            "",
            f"`{plot['cell']}`: the masks of an ANP run (`method='anp'`, {plot['iterations']} iterations) pruned "
            "at each threshold, each variant written by the rewriter and measured with onnxruntime (as the "
            "paper's figure).",
            "",
            f"![ACC and ASR against the threshold]({plot['file']})",
            "",
        ]
    lines += ["## Training", "", _row(["model", "clean ACC", "ASR", "train s"]), _row(["---", "---:", "---:", "---:"])]
    for model in [*cells, *clean]:
        meta = model["meta"]
        lines.append(_row([model["name"], _pct(meta["clean_acc"]), _pct(meta["asr"]), f"{meta['train_seconds']:.0f}"]))
    lines += [
        "",
        "Clean ACC on all 10 000 test images and ASR on all 9 000 non-target test images, as the trainer "
        "measured them (`meta.json`); train time is wall-clock of the training loop on the machine that "
        "trained it, shared with other jobs.",
        "",
    ]
    return "\n".join(lines)


def _scan_source(results: dict) -> str:
    """Where the scan's figures of the backdoored models come from."""
    note = _rescan_note(results)
    if note or not any(cell.get("scan", {}).get("source") for cell in results["cells"]):
        return note
    return (
        "; for the backdoored models, as anp-onnx's purify measured them in its target search (the same "
        "functions, settings and seed, so the same figures; `--rescan` runs the scan itself)"
    )


def _rescan_note(results: dict) -> str:
    again = results.get("scan_remeasured")
    if not again:
        return ""
    return f" (measured again by `{again['command']}` on {again['machine']}, {again['finished']})"


def write_results(results: dict, out_dir: Path, markdown_name: str = "RESULTS.md") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / markdown_name).write_text(results_markdown(results))
