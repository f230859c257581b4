"""The trigger method's step counts as settings, and tools/guided_cost_study.py that measures what
fewer of them cost (issue 6): real purify runs on the small test CNN with a handful of steps."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import INPUT_SHAPE, random_samples

from anp_onnx.methods.trigger.guided import SEARCH, TRIGGERS, UNLEARNING, GuidedSettings, guided_stage_steps

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.guided_cost_study import main  # noqa: E402


def test_the_default_stages_are_the_benchmarked_counts_and_scale_to_at_least_one_step():
    stages = GuidedSettings()
    assert (stages.label_trigger_steps, stages.label_trigger_batch, stages.patch_steps) == (100, 128, 400)
    assert (stages.blend_steps, stages.additive_steps, stages.unlearning_steps) == (200, 60, 300)
    half = stages.scaled(0.5)
    assert (half.label_trigger_steps, half.label_trigger_batch, half.patch_steps) == (50, 64, 200)
    assert (half.blend_steps, half.additive_steps, half.unlearning_steps) == (100, 30, 150)
    assert min(vars(stages.scaled(0.001)).values()) == 1
    # progress counts a label's trigger as one step of the search: its steps and batch are the effort's;
    # the triggers' stage is the patch, two blends and two additive triggers (the target's, a typical label's)
    assert guided_stage_steps(10) == {SEARCH: 10, TRIGGERS: 400 + 2 * 200 + 2 * 60, UNLEARNING: 300}
    assert guided_stage_steps(10, half) == {SEARCH: 10, TRIGGERS: 200 + 2 * 100 + 2 * 30, UNLEARNING: 150}


def test_the_study_purifies_each_folder_with_the_scaled_steps_and_appends_a_line(tmp_path, models):
    folder = tmp_path / "small_cnn"
    folder.mkdir()
    shutil.copyfile(models["batchnorm"], folder / "model.onnx")
    for name, seed in (("clean", 0), ("test", 1), ("poison", 2)):
        random_samples(folder / f"{name}.npz", 64, INPUT_SHAPE, classes=4, seed=seed)
    (folder / "meta.json").write_text(json.dumps({"target": 1}))
    out = tmp_path / "cost.jsonl"

    for _ in range(2):
        result = CliRunner().invoke(main, [str(folder), "--scale", "0.03", "--out", str(out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "small_cnn: target 1 named" in result.output

    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["stage_steps"] == vars(GuidedSettings().scaled(0.03)) == second["stage_steps"]
    assert first["stage_steps"]["patch_steps"] == 12 and first["stage_steps"]["label_trigger_batch"] == 4
    assert set(first["stage_seconds"]) == {"target", "triggers", "unlearning", "pruning"}
    assert first["true_target"] == 1 and 0 <= first["named_target"] < 4
    assert {key: first[key] for key in ("named_target", "after", "pruned")} == {
        key: second[key] for key in ("named_target", "after", "pruned")
    }  # the seed makes the run reproducible
    assert 0 <= first["after"]["acc"] <= 1 and first["seconds"] > 0
