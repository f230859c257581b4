"""purify's progress counts the images each step passes through the model, so that an estimate taken
early holds when the steps are uneven: `--effort` cuts the label search's batch, not the target's
triggers' (issue 23: at effort 0.02 a step-counting estimate said 2 min where 550 s were measured)."""

from __future__ import annotations

import importlib

from conftest import INPUT_SHAPE, random_samples

from anp_onnx.cli.main import ProgressBar
from anp_onnx.methods.repair.settings import RepairSettings
from anp_onnx.methods.settings import TriggerMethodSettings
from anp_onnx.methods.trigger.guided import guided_work
from anp_onnx.pipeline.purify import purify

CLI = importlib.import_module("anp_onnx.cli.main")  # the module: the package's `main` is the command


def test_the_estimate_is_the_work_left_at_the_pace_of_the_work_done(capsys, monkeypatch):
    times = iter([0.0, 12.0, 13.0, 14.0])
    monkeypatch.setattr(CLI.time, "monotonic", lambda: next(times))
    bar = ProgressBar(0, "synthesising triggers")
    bar.advance(1_000, 100_000)  # the pace is measured from the first report on
    bar.advance(2_000, 100_000)  # 1,000 images in 12 s, 98,000 to go
    bar.advance(10_000, 100_000)
    bar.advance(100_000, 100_000)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "synthesising triggers: about 20 min left (20 min in all at the pace of the first 12 s)",
        "synthesising triggers: 10000/100000, about 2 min left",
        "synthesising triggers: 100000/100000, about 0 s left",
    ]


def test_short_work_gets_no_estimate_and_a_jump_past_several_tenths_one_line(capsys, monkeypatch):
    times = iter([0.0, 11.0, 12.0])
    monkeypatch.setattr(CLI.time, "monotonic", lambda: next(times))
    bar = ProgressBar(0, "optimising masks")
    bar.advance(1, 100)
    bar.advance(50, 100)  # 11 s for 49, 50 to go: 11 s more, no estimate line
    bar.advance(100, 100)
    assert capsys.readouterr().err.splitlines() == [
        "optimising masks: 50/100, about 11 s left",
        "optimising masks: 100/100, about 0 s left",
    ]


def test_purify_reports_each_steps_images_up_to_the_stages_work(tmp_path, models):
    data = random_samples(tmp_path / "clean.npz", 64, INPUT_SHAPE, classes=4)
    settings = TriggerMethodSettings(effort=0.03, repair=RepairSettings(mode="never"))
    stages = settings.at_effort().stages
    reports: list[tuple[int, int]] = []
    purify(
        models["batchnorm"],
        data,
        tmp_path / "out.onnx",
        settings=settings,
        on_progress=lambda done, total: reports.append((done, total)),
    )
    totals = {total for _, total in reports}
    assert totals == {guided_work(4, stages)}
    done = [count for count, _ in reports]
    assert done == sorted(done) and done[-1] == guided_work(4, stages)
    # a label of the search takes its steps at the cut batch; a step of the target's patch, a full one
    assert done[0] == stages.label_trigger_steps * stages.label_trigger_batch == 3 * 4
    assert done[4] - done[3] == 128


def test_a_repair_step_counts_its_batch_and_its_share_of_a_checks_trigger_refit():
    assert RepairSettings().images_per_step == 128 + round(40 * 128 / 25)
