"""Study for issue 22's SIG cells: a universal additive trigger (`methods/trigger/additive.py`) for every
label of each model, at each bound. A backdoor planted by an additive signal (SIG) leaves its target
reachable by a faint perturbation; the study measures how far that separates the target from the other
labels, and from every label of the clean models, to set the evidence threshold (docs/METHOD.md).

One JSON line per model folder and bound (model.onnx, clean.npz, meta.json with "target" and "attack"):

    .venv/bin/python tools/additive_evidence_study.py cache/bench/* examples/* --out out/additive.jsonl

Poisoned data is not read: only clean data decides; meta.json's target only scores the result.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anp_onnx.methods.trigger.additive import DEFAULT_STEPS, synthesise_additive  # noqa: E402
from anp_onnx.pipeline.purify import resolve_device  # noqa: E402
from anp_onnx.pipeline.scan import calibrated_classifier  # noqa: E402


def study_model(folder: Path, bounds: list[float], steps: int, seed: int) -> list[dict[str, object]]:
    classifier, x, y = calibrated_classifier(
        folder / "model.onnx", folder / "clean.npz", resolve_device("auto"), seed=seed
    )
    meta = json.loads((folder / "meta.json").read_text())
    labels = sorted({int(label) for label in y.tolist()})
    rows = []
    for bound in bounds:
        started = time.perf_counter()
        successes = [
            round(synthesise_additive(classifier, x, y, label, bound=bound, steps=steps, seed=seed).success, 4)
            for label in labels
        ]
        rows.append(
            {
                "name": folder.name,
                "attack": meta.get("attack"),
                "true_target": meta["target"] if meta.get("attack") else None,
                "bound": bound,
                "steps": steps,
                "successes": successes,
                "median": statistics.median(successes),
                "best_label": labels[max(range(len(labels)), key=successes.__getitem__)],
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    return rows


@click.command()
@click.argument("folders", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bound", "bounds", type=float, multiple=True, default=[0.03, 0.05, 0.08], show_default=True)
@click.option("--steps", default=DEFAULT_STEPS, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSON lines, appended.")
def main(folders: tuple[Path, ...], bounds: tuple[float, ...], steps: int, seed: int, out: Path) -> None:
    """Additive trigger success per label for each model FOLDER (skipping folders already in OUT)."""
    done = {json.loads(line)["name"] for line in out.read_text().splitlines()} if out.exists() else set()
    out.parent.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if folder.name in done or not (folder / "model.onnx").is_file():
            continue
        for row in study_model(folder, list(bounds), steps, seed):
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            click.echo(
                f"{row['name']} bound {row['bound']}: true {row['true_target']}, best {row['best_label']}, "
                f"successes {row['successes']}, {row['seconds']} s"
            )


if __name__ == "__main__":
    main()
