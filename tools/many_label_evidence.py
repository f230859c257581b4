"""Study for issue 23: is a many-label model's backdoor evidence weighed right when only a shortlist of
labels is searched? (methods/trigger/shortlist.py)

Per model folder this runs the label search as purify does (perturbation errors, the shortlist, a
100-step patch trigger per searched label), then the 400-step patch trigger of the suspected label
(purify's refined trigger), and writes one JSON line: every size, which labels were suspects and
which random references, and each evidence figure with the median taken over every searched label
and over the references alone. The summary line per rule gives the lowest backdoored and highest
clean value, so a threshold can be read off measured models (backdoored and clean controls, e.g.
``make many-label-models``)::

    .venv/bin/python tools/many_label_evidence.py cache/many_labels/* --out out/many_label_evidence.jsonl

Poisoned data is not read: meta.json's target and attack only score the result.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anp_onnx.methods.trigger.synthesis import TriggerSettings, synthesise_trigger  # noqa: E402
from anp_onnx.methods.trigger.target import search_target  # noqa: E402
from anp_onnx.pipeline.device import resolve_device  # noqa: E402
from anp_onnx.pipeline.scan import calibrated_classifier  # noqa: E402


def study_model(folder: Path, seed: int) -> dict[str, object]:
    """The search, the refined trigger of its suspected label, and every size, for one model folder."""
    classifier, x, y = calibrated_classifier(folder / "model.onnx", folder / "clean.npz", resolve_device("auto"), seed)
    started = time.perf_counter()
    search = search_target(classifier, x, y, eps=0.4, seed=seed)
    target = search.evidence.label
    refined = synthesise_trigger(classifier, x, y, target, TriggerSettings("patch", seed=seed))
    meta = json.loads((folder / "meta.json").read_text())
    suspects = search.shortlist.suspects if search.shortlist else len(search.labels)
    return {
        "name": folder.name,
        "attack": meta.get("attack"),
        "true_target": meta["target"] if meta.get("attack") else None,
        "suspected_target": target,
        "share": round(search.evidence.share, 4),
        "labels": search.labels,
        "suspects": suspects,
        "sizes": [round(size, 3) for size in search.sizes],
        "refined_size": round(refined.size, 3),
        "seconds": round(time.perf_counter() - started, 1),
    }


def figures(row: dict) -> dict[str, float]:
    """The evidence figures of one row, the median over every searched label and over the references."""
    sizes = np.asarray(row["sizes"])
    target_size = sizes[row["labels"].index(row["suspected_target"])]
    medians = {"all": float(np.median(sizes)), "references": float(np.median(sizes[row["suspects"] :]))}
    result = {"share": row["share"]}
    for name, median in medians.items():
        result[f"size_ratio_{name}"] = round(float(target_size) / median, 4)
        result[f"refined_ratio_{name}"] = round(row["refined_size"] / median, 4)
    return result


@click.command()
@click.argument("folders", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSON lines, appended.")
def main(folders: tuple[Path, ...], seed: int, out: Path) -> None:
    """Evidence figures for each model FOLDER (skipping folders already in OUT), then their ranges."""
    done = {json.loads(line)["name"] for line in out.read_text().splitlines()} if out.exists() else set()
    out.parent.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if folder.name in done:
            continue
        row = study_model(folder, seed)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        click.echo(f"{row['name']}: true {row['true_target']}, {json.dumps(figures(row))}, {row['seconds']} s")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for name in figures(rows[0]):
        backdoored = [figures(row)[name] for row in rows if row["true_target"] is not None]
        clean = [figures(row)[name] for row in rows if row["true_target"] is None]
        hits = sum(row["suspected_target"] == row["true_target"] for row in rows if row["true_target"] is not None)
        click.echo(f"{name}: backdoored {sorted(backdoored)}, clean {sorted(clean)}, target named {hits}")


if __name__ == "__main__":
    main()
