"""Study for issue 6: what purify's trigger-guided default loses when every stage gets fewer steps.

For each model folder (model.onnx, clean.npz; test.npz, poison.npz and meta.json with "target" when
there), one JSON line: the step counts used, wall time per stage, the named target, ACC/ASR before and after::

    .venv/bin/python tools/guided_cost_study.py examples/badnets_resnet_bn cache/bench/badnets_vgg_bn \\
        --scale 0.5 --out out/guided_cost.jsonl

`--scale 1` is purify's default. Poisoned data only measures; clean data decides, as in purify.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anp_onnx.methods.trigger.guided import GuidedSettings  # noqa: E402
from tools.bench_speed import pruning_plan, timed_purify  # noqa: E402


def study_model(folder: Path, stages: GuidedSettings) -> dict[str, object]:
    """Default purify of the folder's model with `stages`, on its bundled data."""
    meta_path = folder / "meta.json"
    true_target = json.loads(meta_path.read_text()).get("target") if meta_path.is_file() else None
    result, seconds = timed_purify(folder, stages)
    guided = result.guided or {}
    return {
        "name": folder.name,
        "true_target": true_target,
        "named_target": guided.get("suspected_target"),
        "stage_steps": guided.get("stage_steps"),
        "before": {"acc": result.before.acc, "asr": result.before.asr},
        "after": {"acc": result.after.acc, "asr": result.after.asr},
        "pruned": len(pruning_plan(result).neurons),
        "repair_ran": bool(result.repair and result.repair.ran),
        "verdict": result.verdict.name if result.verdict else None,
        "triggers": [trigger["kind"] for trigger in guided.get("triggers", [])],
        "seconds": round(seconds, 1),
        "stage_seconds": guided.get("stage_seconds"),
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--scale", default=0.5, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSON lines, appended.")
def main(folders: tuple[Path, ...], scale: float, out: Path) -> None:
    """Purify each model FOLDER with every stage's steps times SCALE; one JSON line each in OUT."""
    stages = GuidedSettings().scaled(scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        row = study_model(folder, stages)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        acc, asr = (_percent(row["after"][key]) for key in ("acc", "asr"))
        click.echo(
            f"{row['name']}: target {row['true_target']} named {row['named_target']}, "
            f"ACC {acc} ASR {asr}, {row['pruned']} pruned, {row['seconds']} s"
        )


if __name__ == "__main__":
    main()
