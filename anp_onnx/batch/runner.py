"""Purify many models: each in isolation, resumable, judged against a CI policy.

A model is `purified` (its verdict `purified` or `clean`, or unchecked with --method anp), `residual`
(written, but the synthetic trigger still works: a failure whatever the policy), `skipped` (its
output and report are complete and were made from the same input bytes and settings), `refused` (a
graph anp-onnx cannot purify yet) or `failed` (anything else: unreadable file, bad data, a crash).
The output is written before the report, both whole or not at all, so a report that matches its
output proves the model done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from anp_onnx.batch.manifest import PATH_KEYS, BatchJob
from anp_onnx.errors import AnpError, one_line
from anp_onnx.prune import within_budget

STATUSES = ("purified", "residual", "skipped", "failed", "refused")
RAN = ("purified", "residual", "skipped")  # statuses with a written model and its figures
FINGERPRINT_VERSION = 2  # 2: the method's settings dataclass and the repair mode
HASH_CHUNK = 1 << 20
UP_TO_DATE = "up to date: output and report match these inputs and settings (--force redoes it)"


@dataclass(frozen=True)
class ModelOutcome:
    """What happened to one model; `before`/`after` as in the purify report (`acc`, `asr`, sample counts)."""

    name: str
    model: str
    output: str
    report: str
    status: str
    reason: str
    before: dict[str, object] | None = None
    after: dict[str, object] | None = None
    pruned_neurons: int | None = None
    total_neurons: int | None = None
    seconds: float = 0.0
    verdict: str | None = None  # the report's verdict (pipeline/verdict.py); None: not checked (--method anp)


@dataclass(frozen=True)
class Policy:
    """The CI gate: test ACC may drop by at most `max_acc_drop` (0.02 = 2 points) and ASR after
    purification may be at most `max_asr` (checked where poison data gave an ASR)."""

    max_acc_drop: float | None = None
    max_asr: float | None = None

    def violations(self, outcome: ModelOutcome) -> list[str]:
        """What breaks the gate; a `residual` verdict always does."""
        found = ["verdict residual: a backdoor is still live"] if outcome.verdict == "residual" else []
        if outcome.status not in RAN or outcome.before is None or outcome.after is None:
            return found
        before_acc, after_acc, after_asr = outcome.before["acc"], outcome.after["acc"], outcome.after["asr"]
        if self.max_acc_drop is not None and before_acc is not None and after_acc is not None:
            drop = before_acc - after_acc
            if not within_budget(drop, self.max_acc_drop):
                found.append(f"ACC dropped {100 * drop:.2f} points (policy: at most {100 * self.max_acc_drop:.2f})")
        if self.max_asr is not None and after_asr is not None and not within_budget(after_asr, self.max_asr):
            found.append(f"ASR {100 * after_asr:.2f}% after purification (policy: at most {100 * self.max_asr:.2f}%)")
        return found


@dataclass(frozen=True)
class BatchResult:
    outcomes: tuple[ModelOutcome, ...]
    policy: Policy
    executor: str

    @property
    def exit_code(self) -> int:
        """0: every model purified (or already was) within the policy, none residual; 1: otherwise."""
        ok = all(o.status in ("purified", "skipped") and not self.policy.violations(o) for o in self.outcomes)
        return 0 if ok else 1


OnOutcome = Callable[[int, int, ModelOutcome], None]  # (position done, total, outcome)


class Executor(Protocol):
    """Runs `run_job` for each job and hands every outcome to `record` as it comes (`anp_onnx.batch.executors`)."""

    name: str

    def run(self, jobs: list[BatchJob], record: Callable[[ModelOutcome], None]) -> None: ...


def run_batch(
    jobs: list[BatchJob],
    executor: Executor,
    policy: Policy | None = None,
    force: bool = False,
    on_outcome: OnOutcome | None = None,
) -> BatchResult:
    """Run every job not already complete on `executor` (see `anp_onnx.batch.executors`); outcomes in job order."""
    policy = policy or Policy()
    _check_policy_inputs(jobs, policy)
    _prepare_folders(jobs)
    jobs = [dataclasses.replace(job, fingerprint=fingerprint(job)) for job in jobs]
    outcomes: dict[str, ModelOutcome] = {}

    def record(outcome: ModelOutcome) -> None:
        outcomes[outcome.name] = outcome
        if on_outcome is not None:
            on_outcome(len(outcomes), len(jobs), outcome)

    pending = []
    for job in jobs:
        report = None if force else completed_report(job)
        if report is None:
            pending.append(job)
        else:
            record(outcome_of(job, "skipped", UP_TO_DATE, report))
    if pending:
        executor.run(pending, record)
    return BatchResult(tuple(outcomes[job.name] for job in jobs), policy, executor.name)


def run_job(job: BatchJob) -> ModelOutcome:
    """Purify one model and write its report (and plots); never raises except on interrupts."""
    start = time.perf_counter()
    try:
        refusal = refusal_reason(job)
        if refusal is not None:
            return outcome_of(job, "refused", refusal, seconds=time.perf_counter() - start)
        report = _purify_and_report(job)
    except AnpError as error:
        reason = one_line(error)
        return outcome_of(job, "failed", reason, seconds=time.perf_counter() - start)
    except Exception as error:  # a bug, but one model's bug must not stop the others
        traceback.print_exc()
        reason = f"internal error ({type(error).__name__}: {one_line(error)})"
        return outcome_of(job, "failed", reason, seconds=time.perf_counter() - start)
    verdict = report.get("verdict") or {}
    if verdict.get("name") == "residual":
        return outcome_of(job, "residual", verdict["reason"], report, seconds=time.perf_counter() - start)
    reason = f"pruned by {report['criterion']}"
    return outcome_of(job, "purified", reason, report, seconds=time.perf_counter() - start)


def outcome_of(
    job: BatchJob, status: str, reason: str, report: dict[str, object] | None = None, seconds: float = 0.0
) -> ModelOutcome:
    """The outcome of `job`, with the before/after figures of its report when there is one."""
    figures = {}
    if report is not None:
        keys = ("before", "after", "pruned_neurons", "total_neurons")
        figures = {key: report[key] for key in keys}
        figures["verdict"] = (report.get("verdict") or {}).get("name")
    paths = str(job.model), str(job.output), str(job.report)
    return ModelOutcome(job.name, *paths, status, reason, **figures, seconds=round(seconds, 3))


def refusal_reason(job: BatchJob) -> str | None:
    """Why anp-onnx declines this (readable) model, or None; an unreadable file raises AnpError (failed)."""
    from anp_onnx.onnx.model import check_supported, load_model
    from anp_onnx.onnx.neurons import build_neuron_map

    model = load_model(job.model)
    try:
        check_supported(model, job.model)
    except AnpError as error:
        return one_line(error)
    if not build_neuron_map(model).layers:
        return f"{job.model}: no prunable layers found (see `anp-onnx inspect`)"
    return None


def _purify_and_report(job: BatchJob) -> dict[str, object]:
    from anp_onnx.pipeline.purify import purify
    from anp_onnx.report.json_report import purify_report, write_json

    options = job.options
    result = purify(
        job.model,
        options.data,
        job.output,
        test_data=options.test_data,
        poison_data=options.poison_data,
        method=options.method,
        settings=options.settings,
        device=job.device,
        force=True,  # the batch owns its outputs: one without a matching report is incomplete
        class_output=options.class_output,
    )
    report = purify_report(result)
    report["batch"] = {
        "name": job.name,
        "fingerprint": job.fingerprint,
        "output_sha256": file_sha256(job.output),
        "options": options.as_dict(),
    }
    if job.plots_dir is not None:
        from anp_onnx.batch.figures import make_figures

        report.update(make_figures(job, result))
    write_json(job.report, report)  # last: its presence, matching the output, marks the model done
    return report


def fingerprint(job: BatchJob) -> str | None:
    """Hash of the model's and data files' bytes and the purify options; None if a file cannot be read."""
    options = job.options.as_dict()
    try:
        contents = {key: file_sha256(Path(options[key])) if options[key] else None for key in PATH_KEYS}
        contents["model"] = file_sha256(job.model)
    except OSError:
        return None
    described = {key: value for key, value in options.items() if key not in PATH_KEYS}
    payload = {"version": FINGERPRINT_VERSION, "sha256": contents, "options": described}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def completed_report(job: BatchJob) -> dict[str, object] | None:
    """The job's report when its output, report and plots are complete and match its fingerprint."""
    if job.fingerprint is None:
        return None
    try:
        report = json.loads(job.report.read_text())
    except (OSError, ValueError):
        return None
    recorded = report.get("batch") if isinstance(report, dict) else None
    if not isinstance(recorded, dict) or recorded.get("fingerprint") != job.fingerprint:
        return None
    try:
        if file_sha256(job.output) != recorded.get("output_sha256"):
            return None
    except OSError:
        return None
    if not all(path.is_file() for path in job.plot_paths.values()):
        return None
    return report


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_policy_inputs(jobs: list[BatchJob], policy: Policy) -> None:
    if policy.max_acc_drop is None:
        return
    missing = [job.name for job in jobs if job.options.test_data is None]
    if missing:
        raise AnpError(f"--max-acc-drop needs test data (--test-data or the manifest's test_data) for {missing[0]}")


def _prepare_folders(jobs: list[BatchJob]) -> None:
    """Create the output and report folders, and remove temporaries an earlier killed run left there."""
    for job in jobs:
        for path in (job.output, job.report, *job.plot_paths.values()):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise AnpError(f"cannot create folder {path.parent}: {error.strerror or error}") from None
            for leftover in path.parent.glob(f".{path.name}.*.tmp"):
                leftover.unlink(missing_ok=True)
