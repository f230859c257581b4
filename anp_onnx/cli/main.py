"""The `anp-onnx` command: parse options, call the library, print. No logic of its own."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from anp_onnx.cli.options import OTHER, DeclaredOption, SectionedCommand, declared, given, spelled
from anp_onnx.errors import AnpError, one_line
from anp_onnx.options import (
    INPUT_OUTPUT,
    PRUNING_AMOUNT,
    SETTINGS,
    method_settings,
    refuse_foreign,
    refuse_two_amounts,
)


class AnpGroup(click.Group):
    """Turns AnpError into one line on stderr and exit code 2 (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except AnpError as error:
            if ctx.meta.get("debug"):
                raise
            click.echo(f"anp-onnx: error: {one_line(error)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("anp-onnx: interrupted (files are written whole or not at all)", err=True)
            sys.exit(130)

    def main(self, *args: object, **kwargs: object) -> object:
        """Usage errors (a missing option, a value outside its choices) in the same one-line form."""
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as error:
            click.echo(error.ctx.get_help() if error.ctx else str(error))
            sys.exit(2)
        except click.UsageError as error:
            hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx else ""
            click.echo(f"anp-onnx: error: {one_line(error.format_message())}{hint}", err=True)
            sys.exit(2)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.Abort:
            click.echo("anp-onnx: interrupted", err=True)
            sys.exit(130)


@click.group(cls=AnpGroup)
@click.version_option(package_name="anp-onnx")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Repair backdoored ONNX classifiers with Adversarial Neuron Pruning."""
    ctx.meta["debug"] = debug
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(_signal: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary files are removed and nothing half-written stays."""
    raise KeyboardInterrupt


class ProgressBar:
    """Progress on stderr, from the first step on (so early errors print alone), per stage of the work:
    a bar with the time left on a terminal, a line every tenth of the way with the time left otherwise
    (logs of pipelines). Once a stage's steps after its first have taken `ESTIMATE_AFTER_S`, a stage
    expected to last over `LONG_WORK_S` more says so in one line, before the bulk of it. Each stage is
    timed on its own: steps of different stages cost differently."""

    ESTIMATE_AFTER_S = 10.0
    LONG_WORK_S = 120.0

    def __init__(self, length: int, label: str) -> None:
        self.length, self.bar = length, None
        self._start_stage(label)

    def _start_stage(self, label: str) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
        self.label, self.bar = label, None
        self.done = 0
        self.started: float | None = None  # when the stage's first step ended: its pace is measured from there
        self.estimated = False
        self.tenths = 0  # tenths of the stage reported in a line so far

    def advance(self, done: int, total: int, stage: str | None = None) -> None:
        """`done` of `total` steps of `stage` (None: the one this bar was made for) are done; the total
        may be known only once the work has begun."""
        if stage is not None and stage != self.label:
            self._start_stage(stage)
        self.length = total
        now = time.monotonic()
        if self.started is None:
            self.started = now
        moved, self.done = done - self.done, done
        elapsed = now - self.started
        left = remaining_time(elapsed, done - 1, self.length - 1)
        if not self.estimated and elapsed >= self.ESTIMATE_AFTER_S and done < self.length:
            self.estimated = True
            if left > self.LONG_WORK_S:
                prefix = "\n" if self.bar is not None else ""
                pace = f"({duration(elapsed + left)} in all at the pace of the first {elapsed:.0f} s)"
                click.echo(f"{prefix}{self.label}: about {duration(left)} left {pace}", err=True)
        if not sys.stderr.isatty():
            tenths = 10 * done // max(1, self.length)
            if tenths > self.tenths:
                self.tenths = tenths
                pace = f", about {duration(left)} left" if done > 1 else ""  # one step gives no pace yet
                click.echo(f"{self.label}: {done}/{self.length}{pace}", err=True)
            return
        if self.bar is None:
            self.bar = click.progressbar(length=self.length, label=self.label, file=sys.stderr, show_eta=True)
            self.bar.__enter__()
        self.bar.length = self.length
        self.bar.update(moved)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)


def remaining_time(elapsed: float, done: int, total: int) -> float:
    """Seconds left at the pace so far: `done` of `total` steps took `elapsed` seconds."""
    return elapsed / max(1, done) * max(0, total - done)


def duration(seconds: float) -> str:
    """`45 s`, `12 min`, `3 h 05 min`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


SETTING_NAMES = tuple(option.name for option in SETTINGS)
SESSION = ("test_data", "poison_data", "class_output", "device")  # what every purify shares: data, output, device


def _section_option(*flags: str, section: str = INPUT_OUTPUT, **kwargs: object) -> Callable:
    return click.option(*flags, cls=DeclaredOption, section=section, **kwargs)


@main.command(cls=SectionedCommand)
@click.argument("model", type=click.Path(path_type=Path))
@declared("data", command="purify", required=True)
@_section_option("-o", "--output", type=click.Path(path_type=Path), help="Output model [MODEL.purified.onnx].")
@_section_option("--report", type=click.Path(path_type=Path), help="Write a JSON report here.")
@_section_option("--force", is_flag=True, help="Replace the output file if it exists.")
@declared(*SESSION, command="purify")
@declared(*(name for name in SETTING_NAMES if name != "class_output"), command="purify")
@click.pass_context
def purify(
    ctx: click.Context,
    model: Path,
    data: Path,
    output: Path | None,
    report: Path | None,
    force: bool,
    test_data: Path | None,
    poison_data: Path | None,
    class_output: str | None,
    device: str,
    **values: object,
) -> None:
    """Find the backdoor's neurons from clean data, prune them, and write the purified model."""
    from anp_onnx.pipeline.purify import progress_label
    from anp_onnx.pipeline.purify import purify as run_purify
    from anp_onnx.pipeline.verdict import RESIDUAL_EXIT_CODE
    from anp_onnx.report.console import repair_line
    from anp_onnx.report.json_report import before_after_table, percent, purify_report, write_json

    if report and not report.parent.is_dir():
        raise AnpError(f"--report {report}: folder {report.parent} does not exist")
    method = str(values["method"])
    refuse_two_amounts(values, spelled(PRUNING_AMOUNT, "purify"))
    chosen = given(ctx, SETTING_NAMES)
    refuse_foreign(method, chosen, spelled(chosen, "purify"))
    with ProgressBar(0, progress_label(method)) as progress:
        result = run_purify(
            model,
            data,
            output,
            method=method,
            settings=method_settings(method, values),
            test_data=test_data,
            poison_data=poison_data,
            device=device,
            force=force,
            on_progress=progress.advance,
            class_output=class_output,
        )
    summary = purify_report(result)
    if report:
        write_json(report, summary)
    if method == "trigger" and result.guided is not None:
        guided = result.guided
        tied = [candidate["target"] for candidate in guided.get("target_candidates", [])]
        among = f"; of tied labels {', '.join(map(str, tied))}, the smallest full trigger" if tied else ""
        click.echo(
            f"suspected target {guided['suspected_target']} (its trigger {guided['size_ratio']:.2f} x the median "
            f"label's, {100 * guided['target_share']:.0f}% of the perturbation's errors{among}); "
            f"synthetic trigger ASR {percent(guided['synthetic_asr_before'])} -> "
            f"{percent(guided['synthetic_asr_after'])}; stopped: {guided['stopped_because']}"
        )
    elif method == "anp" and result.iterations_run < values["iterations"]:
        iterations = values["iterations"]
        click.echo(f"stopped early after {result.iterations_run} of {iterations} iterations: the pruning had settled")
    click.echo(f"pruned {summary['pruned_neurons']} of {summary['total_neurons']} neurons ({result.plan.criterion})")
    if result.repair is not None and (result.repair.checked or result.repair.ran):
        click.echo(repair_line(result.repair))
    click.echo(before_after_table(result.before, result.after))
    click.echo(f"device {result.device}, onnxruntime {', '.join(result.providers)}")
    click.echo(f"wrote {result.output}")
    if result.verdict is not None:
        click.echo(result.verdict.line())
        if result.verdict.name == "residual":
            sys.exit(RESIDUAL_EXIT_CODE)
    else:
        click.echo(f"verdict: not checked (--method {method} synthesises no trigger to check removal against)")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@declared("data", command="evaluate", required=True, help="Clean labelled test samples (.npz).")
@declared("poison_data", command="evaluate")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@declared("class_output", "device", command="evaluate")
def evaluate(
    model: Path, data: Path, poison_data: Path | None, as_json: bool, class_output: str | None, device: str
) -> None:
    """Measure ACC (and ASR) of a model with onnxruntime."""
    from anp_onnx.data import open_samples
    from anp_onnx.onnx.model import input_shape, load_model
    from anp_onnx.report.json_report import metrics_dict, percent
    from anp_onnx.validate.evaluate import Evaluator

    shape = input_shape(load_model(model))
    clean = open_samples(data, shape, "--data")
    poison = open_samples(poison_data, shape, "--poison-data") if poison_data else None
    evaluator = Evaluator(model, device, class_output)
    metrics = evaluator.measure(clean, poison)
    if as_json:
        click.echo(json.dumps({"model": str(model), **metrics_dict(metrics), "provider": evaluator.provider}, indent=2))
        return
    click.echo(f"ACC {percent(metrics.acc)} on {metrics.clean_samples} samples")
    if poison is not None:
        click.echo(f"ASR {percent(metrics.asr)} on {metrics.poison_samples} samples")
    click.echo(f"onnxruntime {evaluator.provider}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(model: Path, as_json: bool) -> None:
    """Show inputs, outputs and prunable layers, and what cannot be handled."""
    from anp_onnx.onnx.inspect import as_text, describe

    description = describe(model)
    click.echo(json.dumps(description, indent=2) if as_json else as_text(description))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@declared("data", command="scan", required=True)
@declared("eps", command="scan")
@click.option("--rounds", type=click.IntRange(min=1), default=4, show_default=True, help="Adversarial perturbations.")
@click.option(
    "--trigger-steps", type=click.IntRange(min=1), default=100, show_default=True, help="Per label's trigger."
)
@declared("seed", command="scan")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@declared("class_output", "device", command="scan")
def scan(
    model: Path,
    data: Path,
    eps: float,
    rounds: int,
    trigger_steps: int,
    seed: int,
    as_json: bool,
    class_output: str | None,
    device: str,
) -> None:
    """Trigger-free check: do neuron perturbations push clean inputs onto one label, which needs a small trigger?"""
    from anp_onnx.pipeline.scan import scan as run_scan

    with ProgressBar(0, "trigger per label") as progress:

        def on_label(done: int, total: int) -> None:
            progress.advance(done, total)

        result = run_scan(
            model,
            data,
            eps=eps,
            rounds=rounds,
            trigger_steps=trigger_steps,
            seed=seed,
            device=device,
            class_output=class_output,
            on_label=on_label,
        )
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    verdict = "suspicious" if result.suspicious else "no sign of a backdoor"
    click.echo(f"{verdict}: score {result.score:.3f}, suspected target {result.suspected_target}")
    click.echo(
        f"target's trigger {result.size_ratio:.2f} x the median label's; "
        f"{100 * result.target_share:.0f}% of the perturbation's errors land on it"
    )
    click.echo(f"errors under perturbation {100 * result.error_rate:.1f}%; by label {result.label_histogram}")
    if result.shortlist is None:
        click.echo(f"trigger size by label {result.trigger_sizes}")
        return
    pairs = zip(result.trigger_labels, result.trigger_sizes, strict=True)
    sizes = ", ".join(f"{label}: {size}" for label, size in pairs)
    click.echo(f"trigger size of the {len(result.trigger_labels)} labels searched (shortlisted) {{{sizes}}}")


BATCH_EPILOG = (
    "Exit codes: 0 every model purified within the policy, 1 a model failed, was refused or broke the policy, "
    "2 bad usage or input. A rerun skips models already done with the same inputs and settings."
)


@main.command(cls=SectionedCommand, epilog=BATCH_EPILOG)
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@declared("data", command="batch", help="Clean labelled samples (.npz) for every model.")
@_section_option("--out-dir", type=click.Path(path_type=Path), required=True, help="Purified models, reports, summary.")
@_section_option(
    "--manifest", type=click.Path(path_type=Path), help="JSON/YAML list of models with their own settings."
)
@_section_option("--report-dir", type=click.Path(path_type=Path), help="Reports, PNG plots and index.html here.")
@_section_option("--force", is_flag=True, help="Redo models that are already done.")
@_section_option("--executor", section=OTHER, type=click.Choice(["local", "ray"]), default="local", show_default=True)
@declared(*SESSION, command="batch")
@declared(*(name for name in SETTING_NAMES if name != "class_output"), command="batch")
@declared("policy_max_acc_drop", "policy_max_asr", command="batch")
@click.pass_context
def batch(
    ctx: click.Context,
    inputs: tuple[Path, ...],
    data: Path | None,
    out_dir: Path,
    manifest: Path | None,
    report_dir: Path | None,
    force: bool,
    executor: str,
    test_data: Path | None,
    poison_data: Path | None,
    device: str,
    policy_max_acc_drop: float | None,
    policy_max_asr: float | None,
    **values: object,
) -> None:
    """Purify every model in INPUT (.onnx files or folders of them) and/or a manifest, each on its own."""
    from anp_onnx.batch.executors import make_executor
    from anp_onnx.batch.manifest import plan_jobs
    from anp_onnx.batch.page import write_index
    from anp_onnx.batch.runner import Policy, run_batch
    from anp_onnx.batch.summary import outcome_line, write_summary

    chosen = given(ctx, SETTING_NAMES)
    settings = {**chosen, "data": data, "test_data": test_data, "poison_data": poison_data}
    jobs = plan_jobs(inputs, manifest, settings, out_dir, report_dir, device, command_line=spelled(chosen, "batch"))
    runner = make_executor(executor)
    echo = lambda position, total, outcome: click.echo(outcome_line(position, total, outcome))  # noqa: E731
    result = run_batch(jobs, runner, Policy(policy_max_acc_drop, policy_max_asr), force, on_outcome=echo)
    summary_json, summary_markdown = write_summary(out_dir, result)
    if report_dir is not None:
        click.echo(f"report page {write_index(report_dir, result)}")
    click.echo(f"summary {summary_json}, {summary_markdown}")
    sys.exit(result.exit_code)


if __name__ == "__main__":
    main()
