"""The `anp-onnx` command: parse options, call the library, print. No logic of its own."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from anp_onnx.errors import AnpError

DEVICES = click.Choice(["auto", "cpu", "cuda"])


class AnpGroup(click.Group):
    """Turns AnpError into one line on stderr and exit code 2 (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except AnpError as error:
            if ctx.meta.get("debug"):
                raise
            click.echo(f"anp-onnx: error: {' '.join(str(error).split())}", err=True)
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
            click.echo(f"anp-onnx: error: {' '.join(error.format_message().split())}{hint}", err=True)
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
    """Progress on stderr, from the first step on (so early errors print alone): a bar on a terminal,
    a line every tenth of the way otherwise (logs of pipelines)."""

    def __init__(self, length: int, label: str) -> None:
        self.length, self.label, self.bar = length, label, None
        self.done = 0

    def advance(self, done: int, total: int) -> None:
        """`done` of `total` steps are done (the total may be known only once the work has begun)."""
        self.length = total
        self.step()

    def step(self, _iteration: int = 0) -> None:
        self.done += 1
        if not sys.stderr.isatty():
            if self.done == self.length or self.done % max(1, self.length // 10) == 0:
                click.echo(f"{self.label}: {self.done}/{self.length}", err=True)
            return
        if self.bar is None:
            self.bar = click.progressbar(length=self.length, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(1)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)


def device_option(function):
    return click.option(
        "--device",
        type=DEVICES,
        default="auto",
        show_default=True,
        help="Where to optimise and evaluate: CUDA when available with auto.",
    )(function)


def method_option(function):
    return click.option(
        "--method",
        type=click.Choice(["trigger", "anp"]),
        default="trigger",
        show_default=True,
        help="What decides the pruning: trigger (ANP's perturbation names the target, a synthesised trigger "
        "guides pruning within --max-acc-drop) or anp (the paper's masks, with --threshold/--prune-*).",
    )(function)


def class_output_option(function):
    return click.option(
        "--class-output",
        metavar="NAME",
        help="The graph output holding the classes [the first output].",
    )(function)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--data", "data", type=click.Path(path_type=Path), required=True, help="Clean labelled samples (.npz x/y)."
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model [MODEL.purified.onnx].")
@click.option("--test-data", type=click.Path(path_type=Path), help="Clean test samples for ACC.")
@click.option(
    "--poison-data", type=click.Path(path_type=Path), help="Triggered samples labelled with the target, for ASR."
)
@click.option("--report", type=click.Path(path_type=Path), help="Write a JSON report here.")
@click.option("--iterations", type=click.IntRange(min=0), default=2000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--eps", type=click.FloatRange(min=0), default=0.4, show_default=True, help="Perturbation budget.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.2, show_default=True, help="Weight of the clean loss.")
@click.option("--mask-lr", type=click.FloatRange(min=0, min_open=True), default=0.2, show_default=True)
@click.option(
    "--neuron-mode",
    type=click.Choice(["batchnorm", "bias"]),
    default="batchnorm",
    show_default=True,
    help="Layers without BatchNorm: re-create it while optimising (batchnorm) or perturb around the bias.",
)
@click.option("--augment/--no-augment", default=True, show_default=True, help="Random crop and flip, as the paper.")
@click.option("--threshold", type=click.FloatRange(0, 1), help="Prune masks below this [0.2].")
@click.option(
    "--prune-fraction", type=click.FloatRange(0, 1), help="Prune this share of neurons, smallest masks first."
)
@click.option("--prune-count", type=click.IntRange(min=0), help="Prune this many neurons, smallest masks first.")
@click.option(
    "--max-acc-drop",
    type=click.FloatRange(0, 1),
    help="Clean-accuracy budget (0.02 = 2 points): with trigger, how much pruning may cost on --data [0.03]; "
    "with anp, prune the most neurons whose accuracy on held-out clean data drops by at most this.",
)
@click.option(
    "--holdout",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of --data held out from the optimisation for --max-acc-drop.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--mask-average/--no-mask-average",
    default=False,
    show_default=True,
    help="Rank neurons by each mask's mean over the run (after 10% burn-in) rather than its last value.",
)
@click.option(
    "--early-stop/--no-early-stop",
    default=True,
    show_default=True,
    help="Stop once the neurons to prune have not changed for 300 iterations (checked every 100).",
)
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@method_option
@class_output_option
@device_option
def purify(
    model: Path,
    data: Path,
    output: Path | None,
    test_data: Path | None,
    poison_data: Path | None,
    report: Path | None,
    iterations: int,
    batch_size: int,
    eps: float,
    alpha: float,
    mask_lr: float,
    neuron_mode: str,
    augment: bool,
    threshold: float | None,
    prune_fraction: float | None,
    prune_count: int | None,
    max_acc_drop: float | None,
    holdout: float,
    seed: int,
    mask_average: bool,
    early_stop: bool,
    force: bool,
    method: str,
    class_output: str | None,
    device: str,
) -> None:
    """Find the backdoor's neurons from clean data, prune them, and write the purified model."""
    from anp_onnx.methods.anp import AnpSettings
    from anp_onnx.pipeline.purify import PruningChoice, progress_label
    from anp_onnx.pipeline.purify import purify as run_purify
    from anp_onnx.report.json_report import before_after_table, percent, purify_report, write_json

    if report and not report.parent.is_dir():
        raise AnpError(f"--report {report}: folder {report.parent} does not exist")
    if sum(choice is not None for choice in (threshold, prune_fraction, prune_count, max_acc_drop)) > 1:
        raise AnpError("choose one of --threshold, --prune-fraction, --prune-count and --max-acc-drop")
    settings = AnpSettings(
        method=method,
        iterations=iterations,
        batch_size=batch_size,
        eps=eps,
        alpha=alpha,
        mask_lr=mask_lr,
        augment=augment,
        average_masks=mask_average,
        neuron_mode=neuron_mode,
        seed=seed,
    )
    pruning = PruningChoice(
        threshold=threshold, fraction=prune_fraction, count=prune_count, max_acc_drop=max_acc_drop, holdout=holdout
    )
    with ProgressBar(0, progress_label(settings)) as progress:
        result = run_purify(
            model,
            data,
            output,
            test_data=test_data,
            poison_data=poison_data,
            settings=settings,
            pruning=pruning,
            device=device,
            force=force,
            early_stop=early_stop,
            on_progress=progress.advance,
            class_output=class_output,
        )
    summary = purify_report(result)
    if report:
        write_json(report, summary)
    if result.guided is not None:
        guided = result.guided
        click.echo(
            f"suspected target {guided['suspected_target']} (its trigger {guided['size_ratio']:.2f} x the median "
            f"label's, {100 * guided['target_share']:.0f}% of the perturbation's errors); "
            f"synthetic trigger ASR {percent(guided['synthetic_asr_before'])} -> "
            f"{percent(guided['synthetic_asr_after'])}; stopped: {guided['stopped_because']}"
        )
    elif result.iterations_run < iterations:
        click.echo(f"stopped early after {result.iterations_run} of {iterations} iterations: the pruning had settled")
    click.echo(f"pruned {summary['pruned_neurons']} of {summary['total_neurons']} neurons ({result.plan.criterion})")
    click.echo(before_after_table(result.before, result.after))
    click.echo(f"device {result.device}, onnxruntime {', '.join(result.providers)}")
    click.echo(f"wrote {result.output}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Clean labelled test samples (.npz).")
@click.option("--poison-data", type=click.Path(path_type=Path), help="Triggered samples labelled with the target.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@class_output_option
@device_option
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
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Clean labelled samples (.npz).")
@click.option("--eps", type=click.FloatRange(min=0, min_open=True), default=0.4, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=4, show_default=True, help="Adversarial perturbations.")
@click.option(
    "--trigger-steps", type=click.IntRange(min=1), default=100, show_default=True, help="Per label's trigger."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@class_output_option
@device_option
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

        def on_label(label: int, labels: int) -> None:
            progress.advance(label + 1, labels)

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
    click.echo(f"trigger size by label {result.trigger_sizes}")


BATCH_EPILOG = (
    "Exit codes: 0 every model purified within the policy, 1 a model failed, was refused or broke the policy, "
    "2 bad usage or input. A rerun skips models already done with the same inputs and settings."
)


@main.command(epilog=BATCH_EPILOG)
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Clean labelled samples (.npz) for every model.")
@click.option("--out-dir", type=click.Path(path_type=Path), required=True, help="Purified models, reports, summary.")
@click.option("--manifest", type=click.Path(path_type=Path), help="JSON/YAML list of models with their own settings.")
@click.option("--report-dir", type=click.Path(path_type=Path), help="Reports, PNG plots and index.html here.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option(
    "--max-acc-drop",
    type=click.FloatRange(0, 1),
    help="Policy (exit 1): test ACC may drop by at most this (0.02 = 2 points). Needs test data.",
)
@click.option(
    "--max-asr", type=click.FloatRange(0, 1), help="Policy (exit 1): ASR after purification at most this (0.1 = 10%)."
)
@click.option("--test-data", type=click.Path(path_type=Path), help="Clean test samples for ACC.")
@click.option("--poison-data", type=click.Path(path_type=Path), help="Triggered samples labelled with the target.")
@click.option("--iterations", type=click.IntRange(min=0), default=2000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--eps", type=click.FloatRange(min=0), default=0.4, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.2, show_default=True)
@click.option("--neuron-mode", type=click.Choice(["batchnorm", "bias"]), default="batchnorm", show_default=True)
@click.option("--threshold", type=click.FloatRange(0, 1), help="Prune masks below this [0.2].")
@click.option("--prune-fraction", type=click.FloatRange(0, 1), help="Prune this share of neurons.")
@click.option("--prune-count", type=click.IntRange(min=0), help="Prune this many neurons.")
@click.option(
    "--prune-max-acc-drop",
    type=click.FloatRange(0, 1),
    help="Pruning amount (purify's --max-acc-drop): the most neurons whose held-out clean ACC drops by at most this.",
)
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--early-stop/--no-early-stop", default=True, show_default=True)
@click.option("--force", is_flag=True, help="Redo models that are already done.")
@method_option
@class_output_option
@device_option
def batch(
    inputs: tuple[Path, ...],
    out_dir: Path,
    manifest: Path | None,
    report_dir: Path | None,
    executor: str,
    max_acc_drop: float | None,
    max_asr: float | None,
    force: bool,
    device: str,
    **settings: object,
) -> None:
    """Purify every model in INPUT (.onnx files or folders of them) and/or a manifest, each on its own."""
    from anp_onnx.batch.executors import make_executor
    from anp_onnx.batch.manifest import plan_jobs
    from anp_onnx.batch.page import write_index
    from anp_onnx.batch.runner import Policy, run_batch
    from anp_onnx.batch.summary import outcome_line, write_summary

    jobs = plan_jobs(inputs, manifest, settings, out_dir, report_dir, device)
    runner = make_executor(executor)
    echo = lambda position, total, outcome: click.echo(outcome_line(position, total, outcome))  # noqa: E731
    result = run_batch(jobs, runner, Policy(max_acc_drop, max_asr), force, on_outcome=echo)
    summary_json, summary_markdown = write_summary(out_dir, result)
    if report_dir is not None:
        click.echo(f"report page {write_index(report_dir, result)}")
    click.echo(f"summary {summary_json}, {summary_markdown}")
    sys.exit(result.exit_code)


if __name__ == "__main__":
    main()
