"""purify's progress comes per stage, each timed on its own, so that an estimate taken early holds:
steps of different stages cost differently (issue 23: at `--effort 0.02` on a 224-pixel ResNet-18 a
label of the search is two steps of 3 images and an evaluation, a trigger step 128 images in bfloat16)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from anp_onnx.cli.main import ProgressBar
from anp_onnx.methods.repair.settings import RepairSettings
from anp_onnx.methods.settings import TriggerMethodSettings
from anp_onnx.methods.trigger.guided import SEARCH, TRIGGERS, UNLEARNING, guided_stage_steps, trigger_stage_steps
from anp_onnx.pipeline.purify import REPAIRING, purify

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.bench_scale import seconds_in, stage_estimates  # noqa: E402

CLI = importlib.import_module("anp_onnx.cli.main")  # the module: the package's `main` is the command
EXAMPLE = ROOT / "examples" / "badnets_resnet_bn"


def test_each_stage_is_estimated_at_its_own_pace(capsys, monkeypatch):
    times = iter([0.0, 12.0, 13.0, 14.0, 30.0, 31.0])
    monkeypatch.setattr(CLI.time, "monotonic", lambda: next(times))
    bar = ProgressBar(0, SEARCH)
    bar.advance(1, 100, SEARCH)  # the pace is measured from the end of a stage's first step
    bar.advance(2, 100, SEARCH)  # 12 s a step, 98 to go
    bar.advance(100, 100, SEARCH)
    bar.advance(1, 800, TRIGGERS)
    bar.advance(400, 800, TRIGGERS)  # 399 steps in 16 s: 16 s more, not 399 x 12 s
    bar.advance(1, 10, UNLEARNING)  # a tenth of the way, but no pace yet
    assert capsys.readouterr().err.splitlines() == [
        "searching labels: about 20 min left (20 min in all at the pace of the first 12 s)",
        "searching labels: 100/100, about 0 s left",
        "synthesising triggers: 400/800, about 16 s left",
        "unlearning masks: 1/10",
    ]


def test_purify_counts_each_stage_from_its_first_step_to_its_last(tmp_path):
    settings = TriggerMethodSettings(effort=0.02, repair=RepairSettings(mode="always"))
    effective = settings.at_effort()
    reports: dict[str, list[tuple[int, int]]] = {}
    purify(
        EXAMPLE / "model.onnx",
        EXAMPLE / "clean.npz",
        tmp_path / "out.onnx",
        settings=settings,
        on_progress=lambda done, total, stage=None: reports.setdefault(stage, []).append((done, total)),
    )
    assert list(reports) == [SEARCH, TRIGGERS, UNLEARNING, REPAIRING]  # the example's backdoor is found
    totals = {**guided_stage_steps(10, effective.stages), REPAIRING: effective.repair.max_steps}
    for stage, counts in reports.items():
        if stage == REPAIRING:  # repair may stop early, on its checks
            assert counts == [(done, totals[stage]) for done in range(1, len(counts) + 1)]
        elif stage == TRIGGERS:  # a full patch per label the search left tied, announced before the first step
            total = counts[-1][1]
            assert total in {trigger_stage_steps(effective.stages, tied) for tied in range(1, 11)}
            assert counts == [(done, total) for done in range(1, total + 1)]
        else:
            assert counts == [(done, totals[stage]) for done in range(1, totals[stage] + 1)], stage


def test_bench_scale_reads_each_stage_estimate_purify_prints_beside_what_the_stage_took(capsys, monkeypatch):
    times = iter([0.0, 12.0, 14.0, 40.0])
    monkeypatch.setattr(CLI.time, "monotonic", lambda: next(times))
    bar = ProgressBar(0, SEARCH)
    bar.advance(1, 100, SEARCH)
    bar.advance(2, 100, SEARCH)
    bar.advance(1, 40, TRIGGERS)
    bar.advance(2, 40, TRIGGERS)  # 26 s a step: about 16 min more
    stderr = capsys.readouterr().err
    assert stage_estimates(stderr, {"target": 1150.5, "triggers": 990.0}, {"timings_s": {"repair": 0.0}}) == [
        {"stage": SEARCH, "estimate": "20 min", "estimate_seconds": 1200.0, "measured_seconds": 1150.5},
        {"stage": TRIGGERS, "estimate": "17 min", "estimate_seconds": 1020.0, "measured_seconds": 990.0},
    ]
    assert [seconds_in(text) for text in ("45 s", "12 min", "3 h 05 min")] == [45.0, 720.0, 11100.0]
