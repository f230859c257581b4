"""A batch's summary: `summary.json` for the pipeline, `summary.md` for a person, one line per model
as it finishes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from anp_onnx import __version__
from anp_onnx.batch.runner import STATUSES, BatchResult, ModelOutcome
from anp_onnx.errors import one_line
from anp_onnx.onnx.rewrite import write_text_atomically
from anp_onnx.report.json_report import percent


def summary_dict(result: BatchResult) -> dict[str, object]:
    counts = {status: sum(o.status == status for o in result.outcomes) for status in STATUSES}
    models = [{**asdict(o), "violations": result.policy.violations(o)} for o in result.outcomes]
    for model in models:
        model["within_policy"] = model["status"] in ("purified", "skipped") and not model["violations"]
    return {
        "tool": "anp-onnx",
        "version": __version__,
        "executor": result.executor,
        "policy": asdict(result.policy),
        "exit_code": result.exit_code,
        "counts": {**counts, "policy_violations": sum(bool(model["violations"]) for model in models)},
        "models": models,
    }


def write_summary(out_dir: Path, result: BatchResult) -> tuple[Path, Path]:
    """DIR/summary.json and DIR/summary.md, each written whole or not at all."""
    json_path, markdown_path = out_dir / "summary.json", out_dir / "summary.md"
    out_dir.mkdir(parents=True, exist_ok=True)  # outputs may all lie elsewhere (a manifest's absolute paths)
    write_text_atomically(json_path, json.dumps(summary_dict(result), indent=2) + "\n")
    write_text_atomically(markdown_path, markdown_summary(result))
    return json_path, markdown_path


TABLE_HEADER = ("model", "status", "ACC before", "ACC after", "ASR before", "ASR after", "pruned", "policy", "note")


def table_rows(result: BatchResult) -> list[tuple[str, ...]]:
    """One row per model, the cells of TABLE_HEADER."""
    rows = []
    for outcome in result.outcomes:
        violations = result.policy.violations(outcome)
        figures = _figures(outcome)
        if outcome.status in ("failed", "refused"):
            policy, note = "fail", outcome.reason
        else:
            policy, note = ("fail", "; ".join(violations)) if violations else ("pass", outcome.reason)
        rows.append((outcome.name, outcome.status, *figures, policy, note))
    return rows


def markdown_summary(result: BatchResult) -> str:
    counts = ", ".join(f"{sum(o.status == s for o in result.outcomes)} {s}" for s in STATUSES)
    lines = [
        "# anp-onnx batch summary",
        "",
        f"{len(result.outcomes)} models: {counts}; exit code {result.exit_code} ({result.executor} executor)",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in table_rows(result)]
    return "\n".join(lines) + "\n"


def outcome_line(position: int, total: int, outcome: ModelOutcome) -> str:
    """`[2/5] vendor_a: purified, ACC 90.00% -> 88.50%, ASR 100.00% -> 3.10%, 41 of 336 neurons (12.3 s)`"""
    head = f"[{position}/{total}] {outcome.name}: {outcome.status}"
    if outcome.status in ("failed", "refused"):
        return f"{head}: {outcome.reason}"
    acc_before, acc_after, asr_before, asr_after, pruned = _figures(outcome)
    line = f"{head}, ACC {acc_before} -> {acc_after}, ASR {asr_before} -> {asr_after}, {pruned} neurons"
    if outcome.status == "skipped":
        return f"{line} (up to date)"
    verdict = f", verdict {outcome.verdict}" if outcome.verdict else ""
    return f"{line}{verdict} ({outcome.seconds:.1f} s)"


def _figures(outcome: ModelOutcome) -> tuple[str, str, str, str, str]:
    if outcome.before is None or outcome.after is None:
        return ("", "", "", "", "")
    return (
        percent(outcome.before["acc"]),
        percent(outcome.after["acc"]),
        percent(outcome.before["asr"]),
        percent(outcome.after["asr"]),
        f"{outcome.pruned_neurons} of {outcome.total_neurons}",
    )


def _markdown_cell(text: str) -> str:
    return one_line(text).replace("|", "\\|")
