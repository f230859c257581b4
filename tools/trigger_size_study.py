"""Study for issue 5's scan: synthesise a trigger for every label of each model and compare their
sizes. A backdoored model's target is reached with a much smaller trigger than the other labels
(Neural Cleanse's observation); a clean model's sizes are alike. The perturbation histogram that
`anp-onnx scan` reports today is measured alongside, so both signals can be scored on the same models.

One JSON line per model folder (model.onnx, clean.npz, meta.json with "target" and "attack")::

    .venv/bin/python tools/trigger_size_study.py examples/* --steps 100 --out out/trigger_sizes.jsonl

Poisoned data is not read: only clean data decides; meta.json's target only scores the result.
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

from anp_onnx.purify import resolve_device  # noqa: E402
from anp_onnx.scan import calibrated_classifier  # noqa: E402
from anp_onnx.target import perturbation_errors  # noqa: E402
from anp_onnx.trigger import TriggerSettings, synthesise_trigger  # noqa: E402


def anomaly_index(sizes: list[float]) -> float:
    """Neural Cleanse's index of the smallest size: (median - min) / (1.4826 * MAD)."""
    values = np.asarray(sizes)
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    return (median - float(values.min())) / max(mad, 1e-9)


def study_model(folder: Path, steps: int, kind: str, rounds: int) -> dict[str, object]:
    classifier, x, y = calibrated_classifier(
        folder / "model.onnx", folder / "clean.npz", resolve_device("auto"), seed=0
    )
    started = time.perf_counter()
    histogram, errors = perturbation_errors(classifier, x, y, 0.4, rounds, 0)
    labels = sorted(set(y.tolist()))
    sizes, successes = [], []
    for label in labels:
        trigger = synthesise_trigger(classifier, x, y, label, TriggerSettings(kind, steps=steps))
        sizes.append(round(trigger.size, 3))
        successes.append(round(trigger.success, 4))
    meta = json.loads((folder / "meta.json").read_text())
    smallest = labels[int(np.argmin(sizes))]
    return {
        "name": folder.name,
        "attack": meta.get("attack"),
        "true_target": meta["target"] if meta.get("attack") else None,  # clean controls have no attack
        "histogram": [int(count) for count in histogram],
        "errors": errors,
        "kind": kind,
        "steps": steps,
        "sizes": sizes,
        "successes": successes,
        "smallest_label": smallest,
        "min_to_median": round(min(sizes) / float(np.median(sizes)), 4),
        "anomaly_index": round(anomaly_index(sizes), 3),
        "seconds": round(time.perf_counter() - started, 1),
    }


@click.command()
@click.argument("folders", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--steps", default=100, show_default=True, help="Optimisation steps per trigger.")
@click.option("--kind", type=click.Choice(["patch", "blend"]), default="patch", show_default=True)
@click.option("--rounds", default=4, show_default=True, help="Perturbation rounds for the histogram.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSON lines, appended.")
def main(folders: tuple[Path, ...], steps: int, kind: str, rounds: int, out: Path) -> None:
    """Trigger size per label for each model FOLDER; skips folders already in OUT."""
    done = {json.loads(line)["name"] for line in out.read_text().splitlines()} if out.exists() else set()
    out.parent.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if folder.name in done:
            continue
        row = study_model(folder, steps, kind, rounds)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        click.echo(
            f"{row['name']}: true {row['true_target']}, smallest {row['smallest_label']}, "
            f"min/median {row['min_to_median']}, index {row['anomaly_index']}, {row['seconds']} s"
        )


if __name__ == "__main__":
    main()
