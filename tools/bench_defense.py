"""The defence benchmark (issues 3 and 22, run by ``make bench``): anp-onnx against Fine-Pruning and CLP on a
grid of backdoored Fashion-MNIST models, and the trigger-free scan (issue 5) on backdoored and clean models.

For each backdoored model: ACC and ASR before, after ``anp_onnx.pipeline.purify.purify`` with the package's
defaults (500 clean images; prune, then repair when pruning was not enough) with its verdict, after the
same run's pruning alone (its pruning plan rewritten on the original model, no second run), after
Fine-Pruning and after CLP, all written by the same rewriters and measured with onnxruntime; the repair's
cost beside the pruning stage's in the same run; the default purify on the clean models too (verdict, ACC
before and after); the scan's score and suspected target for every model, with the detection AUROC and
target hit rate. Writes ``RESULTS.md``, ``results.json`` and the threshold figure into ``--out``. Models
come from ``tools/bench_grid.py``, trained on first use and cached::

    .venv/bin/python tools/bench_defense.py                                  # everything (hours on 2 CPU cores)
    .venv/bin/python tools/bench_defense.py --cells badnets_resnet --iterations 200 --out out/bench
    .venv/bin/python tools/bench_defense.py --methods fp,clp                  # baselines and scan only
    .venv/bin/python tools/bench_defense.py --external cache/keras_softmax     # a model made elsewhere too

``--external DIR`` adds a backdoored model made outside the grid (``make keras-model``: a Keras CNN exported
by tf2onnx, ending in Softmax) as a row of its own, measured the same way: DIR holds ``model.onnx``,
``clean.npz``, ``test.npz``, ``poison.npz`` and a ``meta.json`` with ``arch``, ``attack`` and ``target``.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from anp_onnx.data import load_samples  # noqa: E402
from anp_onnx.methods import baselines  # noqa: E402
from anp_onnx.methods.repair.settings import RepairSettings  # noqa: E402
from anp_onnx.methods.settings import AnpMethodSettings, AnpSettings, TriggerMethodSettings  # noqa: E402
from anp_onnx.methods.trigger.additive import DEFAULT_BOUND as ADDITIVE_BOUND  # noqa: E402
from anp_onnx.methods.trigger.additive import DEFAULT_STEPS as ADDITIVE_STEPS  # noqa: E402
from anp_onnx.methods.trigger.evidence import ADDITIVE_SUCCESS, SUSPICIOUS_SCORE  # noqa: E402
from anp_onnx.methods.trigger.guided import ANOMALOUS_BLEND, BLEND_STEPS, DEFAULT_MAX_ACC_DROP  # noqa: E402
from anp_onnx.methods.trigger.pruning import TriggerPruningSettings  # noqa: E402
from anp_onnx.methods.trigger.synthesis import TriggerSettings  # noqa: E402
from anp_onnx.methods.trigger.target import LABEL_TRIGGER_STEPS, PERTURBATION_ROUNDS, suspected_target  # noqa: E402
from anp_onnx.methods.trigger.unlearning import UnlearningSettings  # noqa: E402
from anp_onnx.onnx.model import input_shape  # noqa: E402
from anp_onnx.onnx.rewrite import apply_plan, save_model  # noqa: E402
from anp_onnx.pipeline.purify import PruningChoice, PurifyResult, load_prunable, progress_label, purify  # noqa: E402
from anp_onnx.pipeline.scan import scan  # noqa: E402
from anp_onnx.prune import DEFAULT_THRESHOLD, PruningPlan  # noqa: E402
from anp_onnx.report.plots import plot_threshold_sweep  # noqa: E402
from anp_onnx.validate.evaluate import Evaluator, Metrics  # noqa: E402
from anp_onnx.validate.sweep import threshold_sweep  # noqa: E402
from tools.bench_grid import ALL_MODELS, DEFAULT_EPOCHS, BenchModel, ensure_trained, select  # noqa: E402
from tools.bench_report import (  # noqa: E402
    DEFAULT_METHODS,
    METHODS,
    RUNNABLE_METHODS,
    clean_summary,
    method_summary,
    scan_summary,
    write_results,
)

FP_FALLBACK_BUDGET = 0.02  # Fine-Pruning's held-out ACC budget when purify has no default budget of its own
PLOT_FILE = "results_threshold.png"


def log(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def machine(jobs: int = 1) -> str:
    cores = os.cpu_count() or 1
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    if jobs > 1:
        workers = f"{jobs} models at a time, each a worker process with {worker_threads(jobs)} torch thread(s)"
    else:
        workers = f"torch threads {torch.get_num_threads()}"
    return f"{platform.system()} {platform.machine()}, {cores} CPU cores ({workers}){gpu}"


def worker_threads(jobs: int) -> int:
    """Torch threads per worker process when `jobs` models are measured side by side."""
    return max(1, (os.cpu_count() or 1) // jobs)


def metrics(metrics: Metrics) -> dict[str, float | None]:
    return {"acc": metrics.acc, "asr": metrics.asr}


class Cell:
    """One model's files, loaded once."""

    def __init__(self, model: BenchModel, folder: Path) -> None:
        self.model, self.folder = model, folder
        self.path = folder / "model.onnx"
        self.onnx, self.neuron_map, _ = load_prunable(self.path, None)
        shape = input_shape(self.onnx)
        self.clean = load_samples(folder / "clean.npz", shape)
        self.test = load_samples(folder / "test.npz", shape)
        self.poison = load_samples(folder / "poison.npz", shape)
        self.meta = json.loads((folder / "meta.json").read_text())

    def measure(self, path: Path) -> Metrics:
        return Evaluator(path, "cpu").measure(self.test, self.poison)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.model.name,
            "arch": self.model.arch,
            "attack": self.model.attack,
            "export": self.model.export,
            "target": self.model.target,
            "folder": os.path.relpath(self.folder, ROOT),
            "neurons": self.neuron_map.total_neurons,
            "meta": {key: self.meta.get(key) for key in ("clean_acc", "asr", "train_seconds", "seed", "epochs")},
        }


def method_settings(method: str, iterations: int | None) -> TriggerMethodSettings | AnpMethodSettings:
    """The package defaults of `method` ("trigger" or "anp"); `iterations` sets ANP's loop length."""
    if method == "trigger":
        return TriggerMethodSettings()
    return AnpMethodSettings() if iterations is None else AnpMethodSettings(AnpSettings(iterations=iterations))


def run_purify(
    cell: Cell, method: str, iterations: int | None, work_dir: Path, device: str, with_poison: bool = True
) -> tuple[dict, PurifyResult]:
    """`purify` with the package defaults and `method` ("trigger" is the default, "anp" the paper's masks);
    `with_poison` False for a clean model (its ASR means nothing)."""
    settings = method_settings(method, iterations)
    what = progress_label(method)

    quarters: dict[str, int] = {}  # of each stage, the quarters of the way logged so far

    def progress(done: int, total: int, stage: str | None = None) -> None:
        stage = stage or what
        quarter = 4 * done // max(1, total)
        if quarter > quarters.get(stage, 0):
            quarters[stage] = quarter
            log(f"  {method}: {stage} {done}/{total}")

    started = time.perf_counter()
    result = purify(
        cell.path,
        cell.folder / "clean.npz",
        work_dir / f"{cell.model.name}.{method}.onnx",
        method=method,
        settings=settings,
        test_data=cell.folder / "test.npz",
        poison_data=cell.folder / "poison.npz" if with_poison else None,
        device=device,
        force=True,
        on_progress=progress,
    )
    summary = {
        **metrics(result.after),
        "pruned": len(result.plan.neurons),
        "criterion": result.plan.criterion,
        "iterations_run": result.iterations_run,
        "guided": result.guided,
        "timings_s": result.timings,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if result.verdict is not None:
        summary["verdict"] = result.verdict.as_dict()
    if result.repair is not None:
        summary["repair"] = repair_record(result)
    return summary, result


def repair_record(result: PurifyResult) -> dict[str, object]:
    """What the repair stage did in `result` and what it cost beside the pruning stage ("optimise": the
    method's decision) of the same run; the per-initializer list stays in the purify report."""
    assert result.repair is not None
    summary = result.repair.summary()
    changes = summary.pop("changed_initializers")
    summary.pop("checks", None)
    repair_s, pruning_s = result.timings.get("repair", 0.0), result.timings.get("optimise", 0.0)
    return {
        **summary,
        "seconds": round(repair_s, 3),
        "pruning_stage_seconds": round(pruning_s, 3),
        "ratio_to_pruning": round(repair_s / pruning_s, 4) if pruning_s > 0 else None,
        "changed_initializers": len(changes),
        "max_relative_change": max((change["relative_change"] for change in changes), default=0.0),
        "method_pruned": len(result.method_plan.neurons) if result.method_plan is not None else 0,
    }


def run_pruning_only(cell: Cell, result: PurifyResult, work_dir: Path) -> dict:
    """The same purify run's pruning alone (`--repair never`): the plan the method decided before repair,
    rewritten on the original model and measured with the cell's evaluator; no second run."""
    plan = result.method_plan if result.method_plan is not None else result.plan
    entry = run_plan(cell, "pruning", lambda: plan, work_dir)
    entry["rewrite_seconds"] = entry["seconds"]
    # what a `--repair never` run would take: the purify without its repair stage
    entry["seconds"] = round(sum(s for stage, s in result.timings.items() if stage != "repair"), 3)
    return entry


def run_clean_purify(cell: Cell, work_dir: Path, device: str) -> tuple[dict, PurifyResult]:
    """The default purify on a clean control model: its verdict, and ACC before and after measured by the
    cell's evaluator (both files on the same provider, so "unchanged" is exact)."""
    summary, result = run_purify(cell, "trigger", None, work_dir, device, with_poison=False)
    before, after = cell.measure(cell.path).acc, cell.measure(result.output).acc
    summary.update(
        acc=after,
        asr=None,
        acc_change_points=round(100 * (after - before), 4),
        unchanged=after == before,
        verdict_name=result.verdict.name if result.verdict else None,
    )
    return summary, result


def run_plan(cell: Cell, name: str, decide: Callable[[], PruningPlan], work_dir: Path) -> dict:
    """Decide a plan with a baseline, write it with the rewriter, measure the written file."""
    started = time.perf_counter()
    plan = decide()
    output = work_dir / f"{cell.model.name}.{name}.onnx"
    save_model(apply_plan(cell.onnx, cell.neuron_map, plan), output)
    after = cell.measure(output)
    return {
        **metrics(after),
        "pruned": len(plan.neurons),
        "criterion": plan.criterion,
        "seconds": round(time.perf_counter() - started, 3),
    }


SCAN_FIELDS = ("score", "suspected_target", "target_share", "size_ratio", "perturbation_target", "error_rate")


def scan_from_purify(guided: dict) -> dict:
    """The scan's figures as purify's target search measured them: the same functions, seed and settings
    as `anp_onnx.pipeline.scan.scan` (tests/test_bench_defense.py checks that the two agree), so the bench does not
    run them twice on a backdoored model."""
    return {
        "score": guided["score"],
        "suspected_target": guided["suspected_target"],
        "target_share": guided["target_share"],
        "size_ratio": guided["size_ratio"],
        "perturbation_target": suspected_target(np.asarray(guided["label_histogram"]))[0],
        "error_rate": guided["error_rate"],
        "trigger_sizes": guided["label_trigger_sizes"],
        "suspicious": guided["score"] >= SUSPICIOUS_SCORE,
        "seconds": guided["stage_seconds"]["target"],
        "source": "purify's target search",
    }


def run_scan(cell: Cell, device: str) -> dict:
    started = time.perf_counter()
    result = scan(cell.path, cell.folder / "clean.npz", device=device)
    return {
        **{key: getattr(result, key) for key in SCAN_FIELDS},
        "trigger_sizes": result.trigger_sizes,
        "suspicious": result.suspicious,
        "seconds": round(time.perf_counter() - started, 3),
    }


def rescan_results(results_file: Path, cache_dir: Path, epochs: int, device: str, out_dir: Path) -> None:
    """Measure the scan again on every model of an earlier run's results and rewrite its reports; the
    defences' numbers stay as they were measured (the scan does not change a model)."""
    results = json.loads(results_file.read_text())
    by_name = {model.name: model for model in ALL_MODELS}
    for entry in [*results["cells"], *results["clean_models"]]:
        model = by_name[entry["name"]]
        entry["scan"] = run_scan(Cell(model, model.folder(cache_dir, epochs)), device)
        log(f"{model.name}: scan score {entry['scan']['score']:.3f} -> {entry['scan']['suspected_target']}")
    results["scan_remeasured"] = {
        "command": "tools/bench_defense.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    results["scan_summary"] = scan_summary(results["cells"], results["clean_models"])
    results["summary"] = method_summary(results["cells"])  # the same numbers, in this version's layout
    results["clean_summary"] = clean_summary(results["clean_models"])
    write_results(results, out_dir)  # "finished" stays the defences' time
    summary = results["scan_summary"]
    log(f"scan AUROC {summary['auroc']:.3f}, target hit rate {summary['target_hit_rate']:.3f}")


def plot_sweep(cell: Cell, result: PurifyResult, out_dir: Path) -> dict:
    """The paper's figure for one model: ACC and ASR of its ANP masks pruned at each threshold."""
    points = threshold_sweep(cell.onnx, cell.neuron_map, result.masks, cell.test, cell.poison, device="cpu")
    title = f"{cell.model.name}: ACC / ASR against the ANP pruning threshold"
    plot_threshold_sweep(points, out_dir / PLOT_FILE, chosen=DEFAULT_THRESHOLD, title=title)
    return {
        "cell": cell.model.name,
        "file": PLOT_FILE,
        "iterations": result.iterations_run,
        "points": [point.as_dict() for point in points],
    }


def fp_note(budget: float) -> str:
    return (
        "the neurons of the layers just before the classifier head ranked by mean ReLU activation on 80% of "
        "the clean images (measured with onnxruntime on the ONNX graph); the most of them, least active "
        f"first, whose accuracy on the other 20% drops by at most {100 * budget:g} points; pruned neurons "
        "output 0."
    )


def clp_note(u: float) -> str:
    return (
        "per layer, each channel's spectral norm of its weight slice (times |gamma|/sqrt(var+eps) where "
        f"BatchNormalization carries the neurons; hidden Gemm/MatMul layers too); channels above mean + {u:g} "
        "std of their layer output 0. Data-free."
    )


def settings_record(
    iterations: int | None, methods: list[str], with_scan: bool, epochs: int, fp_budget: float, clp_u: float
) -> dict[str, object]:
    """What every method ran with, for the JSON and the Settings section of RESULTS.md."""
    anp_settings = method_settings("anp", iterations)
    assert isinstance(anp_settings, AnpMethodSettings)
    trigger = TriggerMethodSettings()
    repair = RepairSettings()
    pruning = PruningChoice()
    source = "--iterations" if iterations is not None else "package default"
    return {
        "iterations": iterations,
        "guided": {"method": "trigger", **trigger.report_entry()},
        "guided_repair": repair.as_dict(),
        "guided_note": (
            f"method trigger: the target named as the scan names it ({PERTURBATION_ROUNDS} adversarial "
            f"neuron perturbations, eps {trigger.eps:g}, and a patch trigger per label in {LABEL_TRIGGER_STEPS} "
            f"steps), a patch trigger synthesised for it in {TriggerSettings().steps} steps and a blend trigger in "
            f"{BLEND_STEPS} (kept when its opacity is at most {ANOMALOUS_BLEND:g} x a typical label's) and an additive "
            f"one in {ADDITIVE_STEPS} (within {ADDITIVE_BOUND:g} of the value range; kept, in place of the patch when "
            f"it alone is evidence, when it succeeds on at least {ADDITIVE_SUCCESS:g} and a typical label's does not), "
            f"masks unlearned against them in {UnlearningSettings().steps} steps, greedy "
            f"pruning until its ASR is <= {TriggerPruningSettings().max_asr:g} or the next neuron would cost more "
            f"than {DEFAULT_MAX_ACC_DROP:g} of clean accuracy; then repair `{repair.mode}` (it runs when the "
            f"trigger refitted to the pruned model still succeeds above {repair.max_asr:g}, or pruning stopped "
            f"above it): the kept weights trained on the clean data, at most {repair.max_steps} steps, within "
            f"{repair.max_acc_drop:g} of accuracy on a held-out {repair.holdout:g} of it; the verdict from the "
            "refitted trigger's success on the written model"
        ),
        "pruning_note": (
            "the same purify run's pruning plan (decided before repair) rewritten on the original model, as "
            "`--repair never` would write it; no second run"
        ),
        "anp": {"method": "anp", **anp_settings.report_entry()},
        "pruning": {
            key: getattr(pruning, key) for key in ("threshold", "fraction", "count", "max_acc_drop", "holdout")
        },
        "anp_note": f"{anp_settings.optimisation.iterations} iterations ({source}), pruning {pruning}",
        "fp": {"scope": "head", "max_acc_drop": fp_budget, "holdout": 0.2},
        "fp_note": fp_note(fp_budget),
        "clp": {"u": clp_u},
        "clp_note": clp_note(clp_u),
        "methods": methods,
        "scan": with_scan,
        "epochs": epochs,
    }


@dataclass(frozen=True)
class ExternalModel:
    """A backdoored model made outside the grid, read from its folder's meta.json; measured as a grid cell."""

    path: Path
    arch: str
    attack: str
    export: str
    target: int
    backdoored: bool = True

    @property
    def name(self) -> str:
        return self.path.name

    def folder(self, cache_dir: Path, epochs: int) -> Path:
        return self.path

    @classmethod
    def read(cls, folder: Path) -> ExternalModel:
        missing = [name for name in ("model.onnx", "clean.npz", "test.npz", "poison.npz", "meta.json")]
        missing = [name for name in missing if not (folder / name).is_file()]
        if missing:
            raise click.BadParameter(f"{folder} lacks {', '.join(missing)}", param_hint="--external")
        meta = json.loads((folder / "meta.json").read_text())
        export = str(meta.get("export", "external")).split(",")[0]
        return cls(folder, str(meta["arch"]), str(meta["attack"]), export, int(meta["target"]))


@click.command()
@click.option("--cells", default=None, help="Comma-separated name fragments: only models whose name contains one.")
@click.option("--iterations", type=click.IntRange(min=0), default=None, help="ANP iterations [package default].")
@click.option(
    "--methods",
    default=",".join(DEFAULT_METHODS),
    show_default=True,
    help="Defences to run: guided (purify's default; its pruning alone is measured from the same run), anp "
    "(the paper's masks), fp, clp.",
)
@click.option("--scan/--no-scan", "with_scan", default=True, show_default=True, help="Run anp-onnx scan.")
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULT_EPOCHS, show_default=True, help="Training.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=ROOT / "cache" / "bench")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=ROOT / "docs")
@click.option("--train-only", is_flag=True, help="Train and cache the models, measure nothing.")
@click.option(
    "--rescan",
    is_flag=True,
    help="Only measure the scan again on the models of OUT/results.json, keeping its defence numbers.",
)
@click.option("--fp-max-acc-drop", type=click.FloatRange(0, 1), default=None, help="Fine-Pruning's budget.")
@click.option("--clp-u", type=click.FloatRange(min=0), default=baselines.CLP_DEFAULT_U, show_default=True)
@click.option("--plot-cell", default="badnets_resnet_bn", show_default=True, help="Model for the threshold figure.")
@click.option(
    "--plot-iterations",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="ANP iterations for the threshold figure when --methods has no anp.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--external",
    "external_dirs",
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="A backdoored model made outside the grid (folder with model.onnx, clean/test/poison.npz, meta.json), "
    "measured as one more row; repeatable.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Models measured side by side in worker processes (the cores are shared out; per-cell seconds then "
    "count one worker's share).",
)
def main(
    cells: str | None,
    iterations: int | None,
    methods: str,
    with_scan: bool,
    epochs: int,
    cache_dir: Path,
    out_dir: Path,
    train_only: bool,
    rescan: bool,
    fp_max_acc_drop: float | None,
    clp_u: float,
    plot_cell: str,
    plot_iterations: int,
    device: str,
    external_dirs: tuple[Path, ...],
    jobs: int,
) -> None:
    """Measure anp-onnx, Fine-Pruning, CLP and the scan on the benchmark grid; write RESULTS.md and results.json."""
    chosen_methods = [name.strip() for name in methods.split(",") if name.strip()]
    unknown = sorted(set(chosen_methods) - set(RUNNABLE_METHODS))
    if unknown:
        choices = ", ".join(RUNNABLE_METHODS)
        raise click.BadParameter(f"unknown {unknown}; choose from {choices}", param_hint="--methods")
    models = select(cells.split(",") if cells else None)
    external = [ExternalModel.read(folder) for folder in external_dirs]
    log(f"{len(models) + len(external)} models: {', '.join(model.name for model in [*models, *external])}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    training_times = ensure_trained(models, cache_dir, epochs, log=log)
    if train_only:
        return
    if rescan:
        rescan_results(out_dir / "results.json", cache_dir, epochs, device, out_dir)
        return
    work_dir = cache_dir / "purified"
    work_dir.mkdir(exist_ok=True)
    budget = fp_max_acc_drop if fp_max_acc_drop is not None else PruningChoice().max_acc_drop or FP_FALLBACK_BUDGET
    results: dict = {
        "command": "tools/bench_defense.py " + " ".join(sys.argv[1:]),
        "machine": machine(jobs),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": settings_record(iterations, chosen_methods, with_scan, epochs, budget, clp_u),
        "training_seconds_this_run": training_times,
        "cells": [],
        "clean_models": [],
    }
    backdoored = [model for model in models if model.backdoored] + external
    names = [model.name for model in backdoored]
    plot_name = plot_cell if plot_cell in names else (names[0] if names else None)
    job = CellJob(
        cache_dir,
        epochs,
        work_dir,
        out_dir,
        chosen_methods,
        iterations,
        with_scan,
        budget,
        clp_u,
        plot_iterations,
        device,
    )
    work = [(model, model.name == plot_name) for model in backdoored]
    work += [(model, False) for model in models if not model.backdoored]
    for index, entry in enumerate(_run_cells(work, job, jobs), start=1):
        log(f"[{index}/{len(work)}] {entry['name']}: {_one_line(entry)}")
        if "plot" in entry:
            results["plot"] = entry.pop("plot")
        results["cells" if entry["attack"] else "clean_models"].append(entry)
        _finish(results, out_dir)
    order = {model.name: index for index, model in enumerate([*models, *external])}
    for key in ("cells", "clean_models"):
        results[key].sort(key=lambda entry: order[entry["name"]])
    _finish(results, out_dir)
    summary = results["scan_summary"]
    if summary["auroc"] is not None:
        log(f"scan AUROC {summary['auroc']:.3f}, target hit rate {summary['target_hit_rate']:.3f}")
    for method, stats in results["summary"].items():
        drop, asr = stats["mean_acc_drop_points"], stats["mean_asr_percent"]
        log(f"{method}: mean ACC drop {drop:.2f} points, mean ASR {asr:.2f}%")
    log(f"wrote {out_dir / 'RESULTS.md'} and {out_dir / 'results.json'}")


@dataclass(frozen=True)
class CellJob:
    """What every cell is measured with (picklable: cells may run in worker processes)."""

    cache_dir: Path
    epochs: int
    work_dir: Path
    out_dir: Path
    methods: list[str]
    iterations: int | None
    with_scan: bool
    fp_budget: float
    clp_u: float
    plot_iterations: int
    device: str


def measure_cell(model: BenchModel | ExternalModel, plot: bool, job: CellJob) -> dict:
    """One model's entry: ACC/ASR before and after every chosen defence, and the scan; with `plot`, the
    threshold figure's data under "plot". A clean control model gets its clean ACC, the default purify
    (with "guided": its verdict and ACC after) and the scan."""
    started = time.perf_counter()
    cell = Cell(model, model.folder(job.cache_dir, job.epochs))
    entry = cell.describe()
    if not model.backdoored:
        entry["before"] = {"acc": cell.measure(cell.path).acc, "asr": None}
        if "guided" in job.methods:
            entry["guided"], _ = run_clean_purify(cell, job.work_dir, job.device)
        if job.with_scan:
            entry["scan"] = _scan_of(entry, cell, job.device)
        entry["seconds"] = round(time.perf_counter() - started, 3)
        return entry
    entry["before"] = metrics(cell.measure(cell.path))
    log(f"{model.name}: before ACC {entry['before']['acc']:.4f} ASR {entry['before']['asr']:.4f}")
    if "guided" in job.methods:
        entry["guided"], guided_result = run_purify(cell, "trigger", job.iterations, job.work_dir, job.device)
        entry["pruning"] = run_pruning_only(cell, guided_result, job.work_dir)
    anp_result = None
    if "anp" in job.methods:
        entry["anp"], anp_result = run_purify(cell, "anp", job.iterations, job.work_dir, job.device)
    if plot:
        if anp_result is None:
            _, anp_result = run_purify(cell, "anp", job.plot_iterations, job.work_dir, job.device)
        entry["plot"] = plot_sweep(cell, anp_result, job.out_dir)
    if "fp" in job.methods:
        decide = partial(baselines.fine_pruning, cell.onnx, cell.neuron_map, cell.clean, max_acc_drop=job.fp_budget)
        entry["fp"] = run_plan(cell, "fp", decide, job.work_dir)
    if "clp" in job.methods:
        entry["clp"] = run_plan(
            cell, "clp", partial(baselines.clp, cell.onnx, cell.neuron_map, job.clp_u), job.work_dir
        )
    if job.with_scan:
        entry["scan"] = _scan_of(entry, cell, job.device)
    entry["seconds"] = round(time.perf_counter() - started, 3)
    return entry


def _scan_of(entry: dict, cell: Cell, device: str) -> dict:
    """The scan's figures: from the default purify's target search where it ran, else the scan itself."""
    guided = entry.get("guided", {}).get("guided")
    return scan_from_purify(guided) if guided else run_scan(cell, device)


def _run_cells(work: list[tuple[BenchModel | ExternalModel, bool]], job: CellJob, jobs: int) -> Iterator[dict]:
    """The cells' entries as they finish: in this process, or in `jobs` worker processes that share the
    machine's cores (torch threads per worker: cores // jobs)."""
    if jobs <= 1:
        for model, plot in work:
            yield measure_cell(model, plot, job)
        return
    context = multiprocessing.get_context("spawn")
    initargs = (worker_threads(jobs),)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads, initargs=initargs) as pool:
        futures = [pool.submit(measure_cell, model, plot, job) for model, plot in work]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:  # on an error, here or in a cell, stop at the cells already running
            pool.shutdown(wait=False, cancel_futures=True)


def _one_line(entry: dict) -> str:
    parts = []
    for method in METHODS:
        if entry.get(method):
            result = entry[method]
            asr = "–" if result["asr"] is None else f"{result['asr']:.4f}"
            verdict = f", {result['verdict']['name']}" if result.get("verdict") else ""
            parts.append(f"{method} {result['acc']:.4f}/{asr} ({result['pruned']} pruned{verdict})")
    if entry.get("scan"):
        parts.append(f"scan {entry['scan']['score']:.3f} -> {entry['scan']['suspected_target']}")
    return "; ".join(parts) + f"; {entry['seconds']:.0f} s"


def _finish(results: dict, out_dir: Path) -> None:
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["summary"] = method_summary(results["cells"])
    results["clean_summary"] = clean_summary(results["clean_models"])
    results["scan_summary"] = scan_summary(results["cells"], results["clean_models"])
    write_results(results, out_dir)


if __name__ == "__main__":
    main()
