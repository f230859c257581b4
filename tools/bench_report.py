"""The defence benchmark's write-up: detection statistics, the Markdown tables of docs/RESULTS.md and the JSON.

Kept apart from ``tools/bench_defense.py`` (which measures) so the numbers and their layout can be
checked on their own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

METHODS = ("guided", "pruning", "anp", "fp", "clp")  # the columns, in order
RUNNABLE_METHODS = ("guided", "anp", "fp", "clp")  # `--methods`; "pruning" comes from the "guided" run
METHOD_TITLES = {
    "guided": "anp-onnx (prune + repair)",
    "pruning": "pruning only",
    "anp": "ANP masks",
    "fp": "Fine-Pruning",
    "clp": "CLP",
}
DEFAULT_METHODS = ("guided", "fp", "clp")  # `make bench`; the paper's masks ("anp") on request: 4 min a cell
VERDICTS = ("purified", "residual", "clean")
MAX_ASR_PERCENT = 5.0  # issue 22's targets for every cell
MAX_ACC_DROP_POINTS = 3.0


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


def acc_drop_points(cell: dict, method: str) -> float:
    """ACC before minus after `method`, in points (rounded off float noise, so 3.0 is within 3)."""
    return round(100 * (cell["before"]["acc"] - cell[method]["acc"]), 6)


def asr_percent(cell: dict, method: str) -> float:
    return round(100 * cell[method]["asr"], 6)


def meets_targets(cell: dict, method: str) -> bool:
    """Issue 22's goal for one cell: ASR <= 5% with an ACC drop of at most 3 points."""
    return asr_percent(cell, method) <= MAX_ASR_PERCENT and acc_drop_points(cell, method) <= MAX_ACC_DROP_POINTS


def verdict_name(result: dict) -> str | None:
    """The verdict purify gave (None: the method gives none)."""
    verdict = result.get("verdict")
    return verdict["name"] if verdict else None


def failure_reason(result: dict) -> str:
    """Why a cell the method ran on misses the targets, from what purify recorded: no backdoor evidence
    (the detector's miss), or the verdict's reason with where repair stopped and what the budget left."""
    guided = result.get("guided") or {}
    if guided.get("backdoor_evidence") is False:
        return str(guided.get("evidence") or "no backdoor evidence")
    verdict = result.get("verdict") or {}
    parts = [verdict["reason"]] if verdict.get("reason") else []
    repair = result.get("repair") or {}
    if repair.get("ran"):
        stop = repair.get("stopped_because")
        kept = repair.get("held_out_accuracy"), repair.get("held_out_accuracy_reference")
        if stop:
            parts.append(f"repair stopped: {stop}")
        if None not in kept:
            parts.append(f"held-out accuracy {100 * kept[1]:.1f} -> {100 * kept[0]:.1f}")
    elif repair.get("why"):
        parts.append(f"repair did not run: {repair['why']}")
    return "; ".join(parts)


def method_summary(cells: Sequence[dict]) -> dict[str, dict[str, object]]:
    """Per method over the cells it ran on: mean ACC drop (points), mean ASR after, worst cell of each, the
    cells meeting the targets; for a method with verdicts, how many cells got each, how many it repaired,
    and the cells still outside the targets with their verdict."""
    summary: dict[str, dict[str, object]] = {}
    for method in METHODS:
        ran = [cell for cell in cells if cell.get(method)]
        if not ran:
            continue
        drops = [acc_drop_points(cell, method) for cell in ran]
        asrs = [asr_percent(cell, method) for cell in ran]
        stats: dict[str, object] = {
            "cells": len(ran),
            "mean_acc_drop_points": round(sum(drops) / len(ran), 2),
            "max_acc_drop_points": round(max(drops), 2),
            "mean_asr_percent": round(sum(asrs) / len(ran), 2),
            "max_asr_percent": round(max(asrs), 2),
            "cells_meeting_targets": sum(meets_targets(cell, method) for cell in ran),
        }
        failing = [cell for cell in ran if not meets_targets(cell, method)]
        stats["failing_cells"] = [
            {
                "name": cell["name"],
                "acc_drop_points": round(acc_drop_points(cell, method), 2),
                "asr_percent": round(asr_percent(cell, method), 2),
                "verdict": verdict_name(cell[method]),
                "why": failure_reason(cell[method]),
            }
            for cell in failing
        ]
        names = [verdict_name(cell[method]) for cell in ran]
        if any(names):
            stats["verdicts"] = {name: names.count(name) for name in VERDICTS}
            stats["repaired"] = sum(bool(cell[method].get("repair", {}).get("ran")) for cell in ran)
            stats["purified_but_failing"] = [c["name"] for c in failing if verdict_name(c[method]) == "purified"]
        summary[method] = stats
    return summary


def clean_summary(clean: Sequence[dict]) -> dict[str, object]:
    """The default purify on the clean models: does every one get verdict `clean` with its ACC unchanged?"""
    ran = [model for model in clean if model.get("guided")]
    exceptions = [
        model["name"]
        for model in ran
        if not (verdict_name(model["guided"]) == "clean" and model["guided"]["unchanged"])
    ]
    return {
        "models": len(ran),
        "verdicts": {name: sum(verdict_name(model["guided"]) == name for model in ran) for name in VERDICTS},
        "unchanged": sum(bool(model["guided"]["unchanged"]) for model in ran),
        "all_clean_and_unchanged": bool(ran) and not exceptions,
        "exceptions": exceptions,
    }


def cost_summary(cells: Sequence[dict]) -> dict[str, object]:
    """Repair seconds over the same run's pruning-stage seconds: the mean ratio over every cell, and over
    the cells where repair trained weights (elsewhere it only measured the refitted trigger)."""
    records = [cell["guided"]["repair"] for cell in cells if cell.get("guided", {}).get("repair")]
    ratios = [record["ratio_to_pruning"] for record in records if record.get("ratio_to_pruning") is not None]
    ran = [record["ratio_to_pruning"] for record in records if record["ran"] and record.get("ratio_to_pruning")]
    return {
        "cells": len(ratios),
        "mean_ratio": round(sum(ratios) / len(ratios), 3) if ratios else None,
        "max_ratio": round(max(ratios), 3) if ratios else None,
        "repaired_cells": len(ran),
        "mean_ratio_repaired": round(sum(ran) / len(ran), 3) if ran else None,
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _pair(result: dict | None) -> list[str]:
    return [_pct(result["acc"]), _pct(result["asr"])] if result else ["–", "–"]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


NO_CELLS = "No backdoored model measured (yet)."


def _ran(cells: Sequence[dict]) -> list[str]:
    """The methods that ran on at least one cell, in column order."""
    return [method for method in METHODS if any(cell.get(method) for cell in cells)]


def _has_verdicts(cells: Sequence[dict], method: str) -> bool:
    return any(cell.get(method, {}).get("verdict") for cell in cells)


def defence_table(cells: Sequence[dict]) -> list[str]:
    """The paper's Table 1 layout: per model ACC / ASR with no defence and after each method that ran; a
    method with verdicts (anp-onnx's default) also shows the verdict and whether repair changed weights."""
    if not cells:
        return [NO_CELLS]
    methods = _ran(cells)
    header = ["model", "attack", "export", "target", "No defence ACC", "ASR"]
    align = ["---"] * 4 + ["---:"] * 2
    for method in methods:
        header += [f"{METHOD_TITLES[method]} ACC", "ASR"]
        align += ["---:"] * 2
        if _has_verdicts(cells, method):
            header += ["verdict", "repaired"]
            align += ["---"] * 2
    lines = [_row(header), _row(align)]
    for cell in cells:
        row = [cell["arch"], cell["attack"], cell["export"], str(cell["target"]), *_pair(cell["before"])]
        for method in methods:
            row += _pair(cell.get(method))
            if _has_verdicts(cells, method):
                result = cell.get(method) or {}
                repaired = result.get("repair", {}).get("ran")
                row += [verdict_name(result) or "–", "–" if repaired is None else ("yes" if repaired else "no")]
        lines.append(_row(row))
    summary = method_summary(cells)
    average = ["**average**", "", "", "", _pct(_mean(c["before"]["acc"] for c in cells)), ""]
    average[-1] = _pct(_mean(c["before"]["asr"] for c in cells))
    for method in methods:
        stats = summary[method]
        average += [f"drop {stats['mean_acc_drop_points']:.2f}", f"{stats['mean_asr_percent']:.2f}"]
        if _has_verdicts(cells, method):
            counts = stats["verdicts"]
            average += [", ".join(f"{counts[name]} {name}" for name in VERDICTS), f"{stats['repaired']} repaired"]
    lines.append(_row(average))
    return lines


def summary_lines(summary: dict[str, dict]) -> list[str]:
    """One line per method: means, worst cells, the cells meeting the targets; for the method with
    verdicts, their counts, and the cells still failing with their verdict."""
    lines = []
    for method, stats in summary.items():
        line = (
            f"- {METHOD_TITLES[method]}: {stats['cells']} cells, mean ACC drop {stats['mean_acc_drop_points']:.2f} "
            f"points (worst {stats['max_acc_drop_points']:.2f}), mean ASR {stats['mean_asr_percent']:.2f}% "
            f"(worst {stats['max_asr_percent']:.2f}%); **{stats['cells_meeting_targets']} of {stats['cells']}** "
            f"cells meet ASR <= {MAX_ASR_PERCENT:g}% with ACC drop <= {MAX_ACC_DROP_POINTS:g} points"
        )
        if "verdicts" in stats:
            counts = stats["verdicts"]
            line += f"; verdicts: {', '.join(f'{counts[name]} {name}' for name in VERDICTS)}"
            line += f"; repair changed weights in {stats['repaired']}"
        lines.append(line + ".")
    return lines


def failing_lines(summary: dict[str, dict], method: str = "guided") -> list[str]:
    """The cells `method` still leaves outside the targets, each with its verdict, said plainly."""
    if method not in summary:
        return []
    stats, title = summary[method], METHOD_TITLES[method]
    if "failing_cells" not in stats:
        return []
    if not stats["failing_cells"]:
        return [f"- Every cell meets the targets with {title}."]
    lines = [f"- Cells still outside the targets with {title}, and why (from purify's own record):"]
    for cell in stats["failing_cells"]:
        why = f": {cell['why']}" if cell.get("why") else ""
        lines.append(
            f"  - `{cell['name']}` (ACC drop {cell['acc_drop_points']:.2f}, ASR {cell['asr_percent']:.2f}%, "
            f"verdict {cell['verdict'] or '–'}){why}"
        )
    if stats.get("purified_but_failing"):
        named = ", ".join(f"`{name}`" for name in stats["purified_but_failing"])
        lines.append(f"- Verdict `purified` although the measured ASR or ACC misses the targets: {named}.")
    return lines


def repair_table(cells: Sequence[dict]) -> list[str]:
    """Per cell what repair did and what it cost beside the pruning stage of the same purify run."""
    rows = [cell for cell in cells if cell.get("guided", {}).get("repair")]
    if not rows:
        return ["No purify run with a repair stage in this invocation."]
    header = ["model", "verdict", "repair ran", "why", "initializers changed", "largest relative change"]
    header += ["pruned before repair", "repair s", "pruning stage s", "repair / pruning"]
    lines = [_row(header), _row(["---", "---", "---", "---"] + ["---:"] * (len(header) - 4))]
    for cell in rows:
        record = cell["guided"]["repair"]
        ratio = record.get("ratio_to_pruning")
        row = [cell["name"], verdict_name(cell["guided"]) or "–", "yes" if record["ran"] else "no", record["why"]]
        row += [str(record["changed_initializers"]), f"{record['max_relative_change']:.4f}"]
        row += [str(record["method_pruned"]), f"{record['seconds']:.1f}", f"{record['pruning_stage_seconds']:.1f}"]
        row.append("–" if ratio is None else f"{ratio:.2f}")
        lines.append(_row(row))
    return lines


def cost_lines(cells: Sequence[dict]) -> list[str]:
    """The mean ratio of repair time to pruning time, said plainly."""
    cost = cost_summary(cells)
    if cost["mean_ratio"] is None:
        return []
    line = (
        f"Repair / pruning-stage time, measured side by side in each cell's purify run: mean "
        f"**{cost['mean_ratio']:.2f}** (worst {cost['max_ratio']:.2f}) over {cost['cells']} cells"
    )
    if cost["mean_ratio_repaired"] is not None:
        line += f"; {cost['mean_ratio_repaired']:.2f} over the {cost['repaired_cells']} cells where repair trained"
    return [line + " (elsewhere the stage only refits and measures the trigger)."]


def clean_table(clean: Sequence[dict]) -> list[str]:
    """The default purify on the clean control models: ACC before and after, and the verdict."""
    rows = [model for model in clean if model.get("guided")]
    if not rows:
        return ["No clean model purified in this invocation (`--methods` without guided)."]
    lines = [_row(["model", "ACC before", "ACC after", "change (points)", "verdict"])]
    lines.append(_row(["---", "---:", "---:", "---:", "---"]))
    for model in rows:
        result = model["guided"]
        change = f"{result['acc_change_points']:+.2f}"
        lines.append(
            _row(
                [
                    model["name"],
                    _pct(model["before"]["acc"]),
                    _pct(result["acc"]),
                    change,
                    verdict_name(result) or "–",
                ]
            )
        )
    summary = clean_summary(clean)
    if summary["all_clean_and_unchanged"]:
        verdict = f"Every one of the {summary['models']} clean models gets verdict `clean` with its ACC unchanged."
    else:
        named = ", ".join(f"`{name}`" for name in summary["exceptions"])
        verdict = (
            f"**Not** every clean model gets verdict `clean` with its ACC unchanged: {named} "
            f"({summary['verdicts']['clean']} of {summary['models']} clean, {summary['unchanged']} unchanged)."
        )
    return [*lines, "", verdict]


def pruning_table(cells: Sequence[dict]) -> list[str]:
    """How many neurons each method pruned, and the wall time of each step."""
    if not cells:
        return [NO_CELLS]
    methods = _ran(cells)
    header = ["model", "neurons", *(f"{METHOD_TITLES[m]} pruned" for m in methods)]
    header += [*(f"{METHOD_TITLES[m]} s" for m in methods), "scan s", "cell s"]
    lines = [_row(header), _row(["---"] + ["---:"] * (len(header) - 1))]
    for cell in cells:
        row = [cell["name"], str(cell["neurons"])]
        row += [str(cell[m]["pruned"]) if cell.get(m) else "–" for m in methods]
        row += [f"{cell[m]['seconds']:.1f}" if cell.get(m) else "–" for m in methods]
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
    for method in ("guided", "pruning", "anp"):
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
        f"- **anp-onnx (prune + repair)**: `anp_onnx.pipeline.purify.purify` with the package defaults "
        f"({settings['guided_note']}).",
        f"- **pruning only**: {settings.get('pruning_note', 'the same run without repair')}.",
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
        "(points) and the mean ASR after (and the verdicts' counts). The verdict is purify's own, from the "
        "clean data alone: `purified` when the trigger refitted to the written model succeeds at most at the "
        "stop level, `residual` when it still succeeds, `clean` when no backdoor evidence was found; "
        "`repaired`: whether repair changed kept weights. Per method:",
        "",
    ]
    summary = results["summary"]
    lines += summary_lines(summary)
    lines += failing_lines(summary)
    lines += comparison_lines(summary)
    not_run = [METHOD_TITLES[m] for m in METHODS if m not in summary]
    if not_run:
        lines.append(f"- Not run in this invocation: {', '.join(not_run)} (`--methods`).")
    lines += ["", "## Clean models: the default purify", "", *clean_table(clean), ""]
    lines += ["## Cost: repair beside pruning", "", *repair_table(cells), ""]
    cost = cost_lines(cells)
    if cost:
        lines += [*cost, ""]
    lines += ["## Neurons pruned and wall time per cell", "", *pruning_table(cells), ""]
    if any(cell.get("pruning") for cell in cells):
        lines += [
            "anp-onnx (prune + repair) pruned: the neurons the written model has pruned (0 where repair "
            "replaced the pruning with changed weights); pruning only s: the same purify run without its "
            "repair stage.",
            "",
        ]
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
