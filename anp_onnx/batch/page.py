"""`index.html` in the report folder: the batch's summary table, then each model's figures, linked
relatively so the folder can be copied or published as it is."""

from __future__ import annotations

from html import escape
from pathlib import Path

from anp_onnx.batch.manifest import FIGURE_KINDS
from anp_onnx.batch.runner import RAN, BatchResult
from anp_onnx.batch.summary import TABLE_HEADER, table_rows
from anp_onnx.onnx.rewrite import write_text_atomically

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
td.purified, td.skipped { color: #2a7a2a; } td.failed, td.refused, td.residual, td.fail { color: #b22; }
.figures img { max-width: 48%; margin-right: 1%; }
"""


def write_index(report_dir: Path, result: BatchResult) -> Path:
    """Write report_dir/index.html for the batch and return its path."""
    header = "".join(f"<th>{escape(cell)}</th>" for cell in TABLE_HEADER)
    rows = []
    for row in table_rows(result):
        name, status, *figures, policy, note = row
        cells = [f'<td><a href="#{escape(name)}">{escape(name)}</a></td>', f'<td class="{status}">{status}</td>']
        cells += [f"<td>{escape(cell)}</td>" for cell in figures]
        cells += [f'<td class="{policy}">{policy}</td>', f"<td>{escape(note)}</td>"]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    sections = [_model_section(report_dir, outcome) for outcome in result.outcomes]
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>anp-onnx batch report</title>"
        f"<style>{STYLE}</style></head><body>\n<h1>anp-onnx batch report</h1>\n"
        f"<p>{len(result.outcomes)} models, exit code {result.exit_code}, {escape(result.executor)} executor.</p>\n"
        f"<table><tr>{header}</tr>\n" + "\n".join(rows) + "</table>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    path = report_dir / "index.html"
    write_text_atomically(path, page)
    return path


def _model_section(report_dir: Path, outcome) -> str:
    name = escape(outcome.name)
    parts = [f'<h2 id="{name}">{name}</h2>', f"<p>{escape(outcome.status)}: {escape(outcome.reason)}</p>"]
    report = Path(outcome.report)
    if report.parent.resolve() == report_dir.resolve() and report.is_file():
        parts.append(f'<p><a href="{escape(report.name)}">JSON report</a></p>')
    kinds = [kind for method_kinds in FIGURE_KINDS.values() for kind in method_kinds]
    images = [f"{outcome.name}.{kind}.png" for kind in kinds]
    shown = [f'<img src="{escape(image)}" alt="{escape(image)}">' for image in images if (report_dir / image).is_file()]
    if shown and outcome.status in RAN:
        parts.append(f'<div class="figures">{"".join(shown)}</div>')
    return "\n".join(parts)
