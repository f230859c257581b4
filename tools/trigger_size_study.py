"""Study for issue 5's scan: synthesise a trigger for every label of each model and compare their
sizes. A backdoored model's target is reached with a much smaller trigger than the other labels
(Neural Cleanse's observation); a clean model's sizes are alike. The perturbation histogram is
measured alongside, so each signal and `anp-onnx scan`'s weighing of both can be scored on the same models.

One JSON line per model folder (model.onnx, clean.npz, meta.json with "target" and "attack"), then
the AUROC and target hit rate of each rule over all lines in OUT::

    .venv/bin/python tools/trigger_size_study.py examples/* cache/bench/* --out out/trigger_sizes.jsonl

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

from anp_onnx.methods.trigger.synthesis import TriggerSettings, label_triggers  # noqa: E402
from anp_onnx.methods.trigger.target import perturbation_errors, suspected_target, weigh_evidence  # noqa: E402
from anp_onnx.pipeline.purify import resolve_device  # noqa: E402
from anp_onnx.pipeline.scan import TRIGGER_STEPS, calibrated_classifier  # noqa: E402
from tools.bench_report import auroc  # noqa: E402


def anomaly_index(sizes: list[float]) -> float:
    """Neural Cleanse's index of the smallest size: (median - min) / (1.4826 * MAD)."""
    values = np.asarray(sizes)
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    return (median - float(values.min())) / max(mad, 1e-9)


def study_model(folder: Path, steps: int, kind: str, rounds: int, seed: int) -> dict[str, object]:
    classifier, x, y = calibrated_classifier(
        folder / "model.onnx", folder / "clean.npz", resolve_device("auto"), seed=seed
    )
    started = time.perf_counter()
    histogram, errors = perturbation_errors(classifier, x, y, 0.4, rounds, seed)
    triggers = label_triggers(classifier, x, y, TriggerSettings(kind, steps=steps, seed=seed, bfloat16=False))
    sizes = [round(trigger.size, 3) for trigger in triggers]
    meta = json.loads((folder / "meta.json").read_text())
    return {
        "name": folder.name,
        "attack": meta.get("attack"),
        "true_target": meta["target"] if meta.get("attack") else None,  # clean controls have no attack
        "histogram": [int(count) for count in histogram],
        "errors": errors,
        "kind": kind,
        "steps": steps,
        "seed": seed,
        "sizes": sizes,
        "successes": [round(trigger.success, 4) for trigger in triggers],
        "smallest_label": int(np.argmin(sizes)),
        "min_to_median": round(min(sizes) / float(np.median(sizes)), 4),
        "anomaly_index": round(anomaly_index(sizes), 3),
        "seconds": round(time.perf_counter() - started, 1),
    }


RULES = {
    # name: row -> (suspected target, score; higher is more suspicious)
    "perturbation share": lambda row: suspected_target(np.asarray(row["histogram"])),
    "smallest trigger": lambda row: (row["smallest_label"], 1 - row["min_to_median"]),
    "scan (both)": lambda row: _weighed(row),
}


def _weighed(row: dict) -> tuple[int, float]:
    evidence = weigh_evidence(np.asarray(row["histogram"]), row["sizes"])
    return evidence.label, evidence.score


def score_rules(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """AUROC (backdoored against clean rows) and target hit rate of each rule."""
    scored = {}
    for name, rule in RULES.items():
        backdoored = [(rule(row), row["true_target"]) for row in rows if row["true_target"] is not None]
        clean = [rule(row)[1] for row in rows if row["true_target"] is None]
        hits = [label == target for (label, _), target in backdoored]
        scored[name] = {
            "auroc": auroc([score for (_, score), _ in backdoored], clean),
            "target_hit_rate": sum(hits) / len(hits) if hits else None,
            "lowest_backdoored": min((score for (_, score), _ in backdoored), default=None),
            "highest_clean": max(clean, default=None),
        }
    return scored


@click.command()
@click.argument("folders", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--steps", default=TRIGGER_STEPS, show_default=True, help="Optimisation steps per trigger.")
@click.option("--kind", type=click.Choice(["patch", "blend"]), default="patch", show_default=True)
@click.option("--rounds", default=4, show_default=True, help="Perturbation rounds for the histogram.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSON lines, appended.")
def main(folders: tuple[Path, ...], steps: int, kind: str, rounds: int, seed: int, out: Path) -> None:
    """Trigger size per label for each model FOLDER (skipping folders already in OUT), then each rule's scores."""
    done = {json.loads(line)["name"] for line in out.read_text().splitlines()} if out.exists() else set()
    out.parent.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if folder.name in done:
            continue
        row = study_model(folder, steps, kind, rounds, seed)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        click.echo(
            f"{row['name']}: true {row['true_target']}, smallest {row['smallest_label']}, "
            f"min/median {row['min_to_median']}, index {row['anomaly_index']}, {row['seconds']} s"
        )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for name, scored in score_rules(rows).items():
        click.echo(f"{name}: {json.dumps(scored)}")


if __name__ == "__main__":
    main()
