"""What do scan and purify cost as the labels and the inputs grow? (issue 23; `make bench-scale`)

    .venv/bin/python tools/bench_scale.py [--labels 10 43 100 1000] [--sizes 28 64 224] [--out docs/SCALING.md]

Two curves, each run a separate `anp-onnx scan` / `anp-onnx purify` process whose wall time and peak
resident memory (the child's own, `os.wait4`) are measured:

- labels: the repo's small ResNet at 28x28 with 10, 43, 100 and 1,000 output labels, every default
  (`--effort 1`), 500 clean images;
- input size: torchvision ResNet-18 and MobileNetV2 at 28, 64 and 224 pixels with 10 labels, and at 224
  with 1,000, with `--effort` `--large-effort` (every stage's step count scaled; on 2 CPU cores the
  defaults take hours at 224) and `--large-images` clean images. The time estimate purify prints for
  each stage expected to last over 2 min is recorded beside the seconds the stage took.

- pairs: purify alone at equal evidence, at `--pairs-effort`: BadNets Fashion-MNIST rows of seed 0
  (tools/many_label_models.py), pairs with 100 labels beside the same pairs with 10 (`--labels 10`: the
  left image's class), and triples with 1,000 labels beside the same triples with 10. On the untrained
  models of the labels curve the label search finds backdoor evidence at some label counts and not at
  others, so purify's later stages run on some and not on others; these models all carry a live backdoor.

The labels and size curves' models come from tools/scale_models.py (random weights, BatchNorm statistics
from the images, labels the network's own predictions: cost does not depend on training); they are made
once into cache/scale/. The
labels curve is fitted as time = a * labels^b (b: the slope on log-log axes) and time = c + d * labels.
Writes the markdown page, docs/scaling.json and docs/scaling.png.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.many_label_models import folder_name  # noqa: E402

ANP = str(Path(sys.executable).parent / "anp-onnx")
CACHE = ROOT / "cache" / "scale"
CURVES = ("labels", "size", "pairs")
PAIRS = ROOT / "cache" / "many_labels"  # tools/many_label_models.py: BadNets seed 0
ROWS_OF_IMAGES = ((2, 10), (2, 100), (3, 10), (3, 1000))  # (images in a row, labels): pairs, then triples
ESTIMATE = re.compile(r"^([a-z ]+): about (.+?) left \((.+?) in all at the pace", re.MULTILINE)  # one per stage
STAGE_TIMED_AS = {  # purify's progress stages, and the stage seconds of its report that time them
    "searching labels": "target",
    "synthesising triggers": "triggers",
    "unlearning masks": "unlearning",
    "repairing weights": "repair",
}


@dataclass
class Run:
    """One measured process: wall seconds, peak resident memory in MiB, exit code, its output."""

    seconds: float
    peak_rss_mib: float
    returncode: int
    stdout: str
    stderr: str


def measure(command: list[str]) -> Run:
    """Run `command` and measure its wall time and its own peak RSS (`os.wait4` reaps it with its usage)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        return Run(seconds, usage.ru_maxrss / 1024, process.returncode, out.read(), err.read())


@dataclass(frozen=True)
class Case:
    """One model of a curve: which network, how many labels, what input size, how it is purified."""

    curve: str  # "labels" or "size"
    arch: str
    labels: int
    size: int
    images: int
    effort: float

    @property
    def images_in_row(self) -> int:
        """Of the pairs curve: the Fashion-MNIST images side by side in one input (its width over 28)."""
        return self.size // 28

    @property
    def folder(self) -> Path:
        if self.curve == "pairs":
            return PAIRS / folder_name("badnets", 0, self.labels, self.images_in_row)
        return CACHE / f"{self.arch}_{self.size}px_{self.labels}labels_{self.images}"


def make_folder(case: Case) -> Path:
    """The case's model and data (tools/scale_models.py), made once."""
    if case.curve == "pairs" and not (case.folder / "model.onnx").exists():
        command = [sys.executable, str(ROOT / "tools" / "many_label_models.py"), "--attack", "badnets", "--seed", "0"]
        command += ["--width", str(case.images_in_row), "--labels", str(case.labels)]
        subprocess.run([*command, "--out-dir", str(PAIRS)], check=True, cwd=ROOT)
    elif not (case.folder / "model.onnx").exists():
        command = [sys.executable, str(ROOT / "tools" / "scale_models.py"), "--arch", case.arch]
        command += ["--labels", str(case.labels), "--size", str(case.size), "--images", str(case.images)]
        subprocess.run([*command, "--out-dir", str(case.folder)], check=True, cwd=ROOT)
    return case.folder


def measure_case(case: Case, work: Path) -> dict[str, object]:
    """Scan and purify of one case, each in its own process: times, peak memory and what they reported. The
    pairs curve runs purify alone: its label search is the scan's, timed as purify's `target` stage."""
    folder = make_folder(case)
    model, data = str(folder / "model.onnx"), str(folder / "clean.npz")
    scan_steps = max(1, round(100 * case.effort))
    scan_command = [ANP, "scan", model, "--data", data, "--trigger-steps", str(scan_steps), "--json"]
    scan = None if case.curve == "pairs" else measure(scan_command)
    report = work / f"{folder.name}.report.json"
    purify_command = [ANP, "purify", model, "--data", data, "-o", str(work / f"{folder.name}.onnx"), "--force"]
    if (folder / "poison.npz").exists():
        purify_command += ["--test-data", str(folder / "test.npz"), "--poison-data", str(folder / "poison.npz")]
    purify = measure([*purify_command, "--report", str(report), "--effort", str(case.effort)])
    for name, run in (("scan", scan), ("purify", purify)):
        if run is not None and run.returncode not in (0, 3):
            raise click.ClickException(f"{name} of {folder.name} failed ({run.returncode}): {run.stderr[-2000:]}")
    purified = json.loads(report.read_text())
    guided = purified.get("guided") or {}
    scanned = json.loads(scan.stdout) if scan else {"trigger_labels": guided.get("label_trigger_labels", [])}
    return {
        **asdict(case),
        "scan_seconds": round(scan.seconds, 1) if scan else None,
        "scan_peak_rss_mib": round(scan.peak_rss_mib) if scan else None,
        "purify_seconds": round(purify.seconds, 1),
        "purify_peak_rss_mib": round(purify.peak_rss_mib),
        "purify_estimates": stage_estimates(purify.stderr, guided.get("stage_seconds") or {}, purified),
        "labels_searched": len(scanned["trigger_labels"]),
        "scan_target": scanned.get("suspected_target"),
        "purify_target": guided.get("suspected_target"),
        "true_target": json.loads((folder / "meta.json").read_text()).get("target"),
        "scan_suspicious": scanned.get("suspicious"),
        "verdict": (purified.get("verdict") or {}).get("name"),
        "acc_before_after": [purified["before"]["acc"], purified["after"]["acc"]],
        "asr_before_after": [purified["before"]["asr"], purified["after"]["asr"]],
        "backdoor_evidence": guided.get("backdoor_evidence"),
        "stage_seconds": guided.get("stage_seconds"),
        "timings": purified.get("timings_s"),
    }


def stage_estimates(stderr: str, stage_seconds: dict[str, float], report: dict) -> list[dict[str, object]]:
    """Each stage's estimate that purify printed (stages expected to last over 2 min more), in all,
    beside the seconds the stage took (the report's; the label search's include its neuron perturbations)."""
    measured = {**stage_seconds, "repair": (report.get("timings_s") or {}).get("repair")}
    return [
        {
            "stage": stage,
            "estimate": in_all,
            "estimate_seconds": seconds_in(in_all),
            "measured_seconds": measured.get(STAGE_TIMED_AS.get(stage, "")),
        }
        for stage, _left, in_all in ESTIMATE.findall(stderr)
    ]


def seconds_in(duration: str) -> float:
    """Seconds in a duration as the progress line writes it: `45 s`, `12 min`, `3 h 05 min`."""
    hours = re.search(r"(\d+) h", duration)
    minutes = re.search(r"(\d+) min", duration)
    seconds = re.fullmatch(r"(\d+) s", duration.strip())
    if not (hours or minutes or seconds):
        raise ValueError(f"not a duration: {duration!r}")
    if seconds:
        return float(seconds.group(1))
    return 3600.0 * int(hours.group(1) if hours else 0) + 60.0 * int(minutes.group(1) if minutes else 0)


def fits(rows: list[dict[str, object]], key: str) -> dict[str, float]:
    """`key` (seconds) against labels: the log-log slope b of a * labels^b, and c + d * labels."""
    labels = np.array([row["labels"] for row in rows], dtype=float)
    seconds = np.array([row[key] for row in rows], dtype=float)
    slope, _ = np.polyfit(np.log(labels), np.log(seconds), 1)
    per_label, intercept = np.polyfit(labels, seconds, 1)
    return {
        "log_log_slope": round(float(slope), 3),
        "seconds_per_label": round(float(per_label), 4),
        "intercept_seconds": round(float(intercept), 1),
    }


def ratios(rows: list[dict[str, object]], key: str) -> dict[int, float]:
    """`key` at each label count over its value at 10 labels (the same network)."""
    base = next(row[key] for row in rows if row["labels"] == 10)
    return {int(row["labels"]): round(float(row[key]) / float(base), 2) for row in rows}


def machine() -> str:
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores{gpu}"


def plot(
    labels_rows: list[dict[str, object]],
    size_rows: list[dict[str, object]],
    path: Path,
    pair_rows: list[dict[str, object]] | None = None,
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=110)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    labels = [row["labels"] for row in labels_rows]
    for key, name in (("scan_seconds", "scan"), ("purify_seconds", "purify")):
        left.plot(labels, [row[key] for row in labels_rows], marker="o", label=name)
    for size in sorted({row["size"] for row in pair_rows or []}):
        same_width = [row for row in pair_rows if row["size"] == size]
        left.plot(
            [row["labels"] for row in same_width],
            [row["purify_seconds"] for row in same_width],
            marker="^",
            label=f"purify, 28x{size} rows with a backdoor (effort {same_width[0]['effort']})",
        )
    base = next(row["scan_seconds"] for row in labels_rows if row["labels"] == 10)
    left.plot(
        labels,
        [base * count / 10 for count in labels],
        linestyle=":",
        color="grey",
        label="scan, a trigger per label (linear)",
    )
    left.set_xscale("log")
    left.set_yscale("log")
    effort = labels_rows[0]["effort"] if labels_rows else ""
    left.set_xlabel(f"output labels (small ResNet, 28x28, effort {effort})")
    left.set_ylabel("seconds")
    left.legend(fontsize=8)
    left.grid(alpha=0.3, which="both")
    for arch in sorted({row["arch"] for row in size_rows}):
        points = [row for row in size_rows if row["arch"] == arch and row["labels"] == 10]
        right.plot(
            [row["size"] for row in points],
            [row["purify_seconds"] for row in points],
            marker="o",
            label=f"{arch} purify",
        )
        right.plot(
            [row["size"] for row in points],
            [row["scan_seconds"] for row in points],
            marker="s",
            linestyle="--",
            label=f"{arch} scan",
        )
    if not size_rows:
        right.text(0.5, 0.5, "input-size curve not measured in this run", ha="center", transform=right.transAxes)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel(f"input size in pixels (10 labels, effort {size_rows[0]['effort'] if size_rows else ''})")
    right.set_ylabel("seconds")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, which="both")
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path)


def markdown(results: dict[str, object]) -> str:
    """docs/SCALING.md from the measured results."""
    labels_rows, size_rows = results["labels"], results["size"]
    lines = [
        "# Scaling: labels and input size",
        "",
        f"Measured by `make bench-scale` ({results['command']}) on {results['machine']}, {results['started']}; "
        f"{results['minutes']}. Each figure is one `anp-onnx scan` or `anp-onnx purify` process: wall "
        "time and its own peak resident memory (`os.wait4`). Models of the labels and size curves: "
        "tools/scale_models.py (random weights, BatchNorm statistics from the images, the network's own "
        "predictions as labels: the cost does not depend on training); of the equal-evidence curve: "
        "tools/many_label_models.py (trained, backdoored). How the label search stays sub-linear: "
        "anp_onnx/methods/trigger/shortlist.py and docs/METHOD.md.",
        "",
        "![scan and purify time against labels and input size](scaling.png)",
        "",
        f"## Against labels (small ResNet, 28x28, 500 clean images, effort {labels_rows[0]['effort']})",
        "",
        "| labels | labels searched | scan s | scan x10 labels | scan peak MiB | purify s | purify x10 labels "
        "| purify peak MiB | verdict |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    scan_ratio, purify_ratio = ratios(labels_rows, "scan_seconds"), ratios(labels_rows, "purify_seconds")
    for row in labels_rows:
        lines.append(
            f"| {row['labels']} | {row['labels_searched']} | {row['scan_seconds']} | {scan_ratio[row['labels']]} "
            f"| {row['scan_peak_rss_mib']} | {row['purify_seconds']} | {purify_ratio[row['labels']]} "
            f"| {row['purify_peak_rss_mib']} | {row['verdict']} |"
        )
    scan_fit, purify_fit = results["fits"]["scan"], results["fits"]["purify"]
    lines += [
        "",
        f"Fitted: scan time ~ labels^{scan_fit['log_log_slope']} ({scan_fit['seconds_per_label']} s per label "
        f"over {scan_fit['intercept_seconds']} s), purify time ~ labels^{purify_fit['log_log_slope']} "
        f"({purify_fit['seconds_per_label']} s per label over {purify_fit['intercept_seconds']} s). A trigger "
        "per label, as before the shortlist, is slope 1 (the grey line in the plot).",
        "",
        "## Against input size (torchvision ResNet-18 and MobileNetV2)",
        "",
        "| network | size | labels | clean images | effort | scan s | scan peak MiB | purify s | purify peak MiB "
        "| purify's estimates (stage: estimate in all (measured)) | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in size_rows:
        lines.append(
            f"| {row['arch']} | {row['size']} | {row['labels']} | {row['images']} | {row['effort']} "
            f"| {row['scan_seconds']} | {row['scan_peak_rss_mib']} | {row['purify_seconds']} "
            f"| {row['purify_peak_rss_mib']} | {estimates_cell(row)} "
            f"| {row['verdict']} |"
        )
    lines += pairs_section(results.get("pairs", []))
    lines += ["", *results.get("notes", []), ""]
    lines += [MANY_LABELS_POINTER, ""]
    return "\n".join(lines)


def estimates_cell(row: dict[str, object]) -> str:
    """The stages purify estimated, each `stage: estimate (measured s)`."""
    estimates = row["purify_estimates"]
    if not estimates:
        return "none (no stage over 2 min)"
    return "; ".join(f"{item['stage']}: {item['estimate']} ({item['measured_seconds']} s)" for item in estimates)


def pairs_section(rows: list[dict[str, object]]) -> list[str]:
    """The equal-evidence comparison: one network and backdoor per row width, a 10-label head beside the
    100-label one (pairs) or the 1,000-label one (triples)."""
    if not rows:
        return []
    lines = [
        "",
        f"## purify at equal evidence: 10, 100 and 1,000 labels (Fashion-MNIST rows, BadNets, effort "
        f"{rows[0]['effort']})",
        "",
        "Per width, the same flatten_cnn on the same rows of images and the same trigger: pairs (28x56) labelled "
        "10 a + b (100 labels) or by the left image alone (10), triples (28x84) labelled 100 a + 10 b + c (1,000) "
        "or by the left image alone (10): tools/many_label_models.py `--width` and `--labels`. Each carries a live "
        "backdoor, so purify should meet backdoor evidence on each; the stage seconds say which stages ran "
        "(target: the label search, which is what a scan does; repair: the repair stage). The ratios are to the "
        "10-label model of the same width.",
        "",
        "| input | labels | labels searched | target (named) | purify s | purify x10 labels | purify peak MiB "
        "| stage seconds | verdict | ACC before -> after | ASR before -> after |",
        "|---|---:|---:|---|---:|---:|---:|---|---|---|---|",
    ]
    for size in sorted({row["size"] for row in rows}):
        same_width = [row for row in rows if row["size"] == size]
        purify_ratio = ratios(same_width, "purify_seconds")
        for row in same_width:
            acc, asr = row.get("acc_before_after") or [None, None], row.get("asr_before_after") or [None, None]
            ran = {**(row["stage_seconds"] or {}), "repair": (row["timings"] or {}).get("repair", 0.0)}
            stages = ", ".join(f"{name} {seconds:.0f}" for name, seconds in ran.items() if seconds)
            lines.append(
                f"| 28x{size} | {row['labels']} | {row['labels_searched']} | {row['true_target']} "
                f"({row['purify_target']}) | {row['purify_seconds']} | {purify_ratio[row['labels']]} "
                f"| {row['purify_peak_rss_mib']} | {stages} | {row['verdict']} "
                f"| {percent(acc[0])} -> {percent(acc[1])} | {percent(asr[0])} -> {percent(asr[1])} |"
            )
    return lines


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


MANY_LABELS_POINTER = (
    "The many-label benchmark (100-label Fashion-MNIST pair models: hit rate and backdoor evidence, clean "
    "controls): docs/MANY_LABELS.md."
)


@click.command()
@click.option("--labels", "label_counts", type=int, multiple=True, default=(10, 43, 100, 1000), show_default=True)
@click.option("--sizes", type=int, multiple=True, default=(28, 64, 224), show_default=True)
@click.option("--archs", type=str, multiple=True, default=("resnet18", "mobilenet_v2"), show_default=True)
@click.option("--labels-effort", type=float, default=1.0, show_default=True, help="--effort of the labels curve.")
@click.option("--large-effort", type=float, default=0.02, show_default=True, help="--effort of the size curve.")
@click.option("--large-images", type=int, default=128, show_default=True, help="Clean images of the size curve.")
@click.option("--pairs-effort", type=float, default=1.0, show_default=True, help="--effort of the pair models.")
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "docs" / "SCALING.md", show_default=True)
@click.option(
    "--curve",
    "curves",
    type=click.Choice(CURVES),
    multiple=True,
    help="Measure only these curves [all three; none with --from-rows].",
)
@click.option(
    "--from-rows",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Rows measured earlier (out/bench_scale/rows.jsonl) for the curves this run does not measure.",
)
def main(
    label_counts: tuple[int, ...],
    sizes: tuple[int, ...],
    archs: tuple[str, ...],
    labels_effort: float,
    large_effort: float,
    large_images: int,
    pairs_effort: float,
    out: Path,
    curves: tuple[str, ...],
    from_rows: Path | None,
) -> None:
    """Scan and purify time and peak memory against labels and input size; writes SCALING.md."""
    started, clock = time.strftime("%Y-%m-%d %H:%M"), time.monotonic()
    work = ROOT / "out" / "bench_scale"
    work.mkdir(parents=True, exist_ok=True)
    labels_cases = [Case("labels", "small_resnet", count, 28, 500, labels_effort) for count in label_counts]
    size_cases = [Case("size", arch, 10, size, large_images, large_effort) for arch in archs for size in sizes]
    size_cases += [Case("size", arch, 1000, max(sizes), large_images, large_effort) for arch in archs]
    pair_cases = [Case("pairs", "flatten_cnn", count, 28 * row, 500, pairs_effort) for row, count in ROWS_OF_IMAGES]
    results: dict[str, object] = {
        "command": " ".join(["tools/bench_scale.py", *sys.argv[1:]]).strip(),
        "machine": machine(),
        "started": started,
    }
    earlier = [json.loads(line) for line in from_rows.read_text().splitlines()] if from_rows else []
    curves = curves or (() if from_rows else CURVES)
    for curve, cases in (("pairs", pair_cases), ("size", size_cases), ("labels", labels_cases)):
        if curve not in curves:
            results[curve] = [row for row in earlier if row["curve"] == curve]
            continue
        rows = []
        for case in cases:
            click.echo(f"[{time.strftime('%H:%M:%S')}] {case.arch} {case.size}px {case.labels} labels", err=True)
            rows.append(measure_case(case, work))
            (work / "rows.jsonl").open("a").write(json.dumps(rows[-1]) + "\n")  # what a cut-short run measured
            click.echo(
                json.dumps(
                    {key: rows[-1][key] for key in ("scan_seconds", "purify_seconds", "purify_peak_rss_mib", "verdict")}
                ),
                err=True,
            )
        results[curve] = rows
    if len(results["labels"]) < 2:
        raise click.ClickException("the page needs the labels curve: measure it, or give its rows with --from-rows")
    results["fits"] = {name: fits(results["labels"], f"{name}_seconds") for name in ("scan", "purify")}
    minutes = round((time.monotonic() - clock) / 60, 1)
    results["minutes"] = f"{minutes} minutes" if curves else "written from rows measured earlier (see the notes)"
    (out.parent / "scaling.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results["labels"], results["size"], out.parent / "scaling.png", results["pairs"])
    out.write_text(markdown(results))
    click.echo(f"wrote {out}, {out.parent / 'scaling.json'}, {out.parent / 'scaling.png'}", err=True)


if __name__ == "__main__":
    main()
