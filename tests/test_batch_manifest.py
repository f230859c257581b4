"""Planning a batch: INPUT folders, manifests (JSON and YAML), names, settings and the resume fingerprint."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from anp_onnx.batch.manifest import plan_jobs
from anp_onnx.batch.runner import fingerprint
from anp_onnx.errors import AnpError

CLI_DEFAULTS = {"method": "trigger", "data": None}  # the CLI passes only the options the user gave


@pytest.fixture
def tree(tmp_path, models, image_samples) -> Path:
    """vendor_a/model.onnx, vendor_b/model.onnx, a manifest folder with data beside it."""
    for vendor in ("vendor_a", "vendor_b"):
        (tmp_path / vendor).mkdir()
        shutil.copyfile(models["batchnorm"], tmp_path / vendor / "model.onnx")
    (tmp_path / "config").mkdir()
    shutil.copyfile(image_samples, tmp_path / "config" / "clean.npz")
    return tmp_path


MANIFEST = {
    "defaults": {"data": "clean.npz", "iterations": 50},
    "models": [
        {"model": "../vendor_a/model.onnx", "name": "a", "prune_count": 3},
        {"model": "../vendor_b/model.onnx", "output": "b/purified.onnx", "iterations": 7, "augment": False},
    ],
}
MANIFEST_YAML = """
defaults:
  data: clean.npz
  iterations: 50
models:
  - model: ../vendor_a/model.onnx
    name: a
    prune_count: 3
  - model: ../vendor_b/model.onnx
    output: b/purified.onnx
    iterations: 7
    augment: false
"""


def test_a_manifest_gives_per_model_settings_over_the_command_line(tree):
    manifest = tree / "config" / "batch.json"
    manifest.write_text(json.dumps(MANIFEST))
    settings = {**CLI_DEFAULTS, "method": "anp", "threshold": 0.3}
    first, second = plan_jobs([], manifest, settings, tree / "out", tree / "reports")
    assert (first.name, second.name) == ("a", "vendor_b_model")
    assert first.model == tree / "config" / "../vendor_a/model.onnx"
    assert first.options.data == tree / "config" / "clean.npz"
    first_anp, second_anp = first.options.settings, second.options.settings
    assert (first_anp.optimisation.iterations, second_anp.optimisation.iterations) == (50, 7)
    assert first_anp.pruning.count == 3 and first_anp.pruning.threshold is None  # replaces, no clash
    assert second_anp.pruning.threshold == 0.3 and second_anp.optimisation.augment is False
    assert second.output == tree / "out" / "b" / "purified.onnx"
    assert first.report == tree / "reports" / "a.report.json"
    assert first.plot_paths == {"masks": tree / "reports" / "a.masks.png", "sweep": tree / "reports" / "a.sweep.png"}


def test_the_default_method_draws_the_trigger_and_the_rounds_and_an_entry_can_pick_anp(tree):
    manifest = tree / "config" / "batch.json"
    entries = [{"model": "../vendor_a/model.onnx", "name": "a"}, {"model": "../vendor_b/model.onnx", "method": "anp"}]
    manifest.write_text(json.dumps({"defaults": {"data": "clean.npz"}, "models": entries}))
    first, second = plan_jobs([], manifest, CLI_DEFAULTS, tree / "out", tree / "reports")
    assert (first.options.method, second.options.method) == ("trigger", "anp")
    assert set(first.plot_paths) == {"trigger", "rounds", "repair"} and set(second.plot_paths) == {"masks", "sweep"}


def test_yaml_manifests_read_like_json(tree):
    pytest.importorskip("yaml")
    as_json, as_yaml = tree / "config" / "batch.json", tree / "config" / "batch.yaml"
    as_json.write_text(json.dumps(MANIFEST))
    as_yaml.write_text(MANIFEST_YAML)
    settings = {**CLI_DEFAULTS, "method": "anp"}
    assert plan_jobs([], as_yaml, settings, tree / "out") == plan_jobs([], as_json, settings, tree / "out")


def test_an_entry_with_an_option_its_method_does_not_use_is_refused_but_defaults_are_left_out(tree):
    manifest = tree / "config" / "batch.json"
    manifest.write_text(json.dumps(MANIFEST))  # prune_count in an entry, iterations in the defaults
    with pytest.raises(AnpError, match="model a: 'prune_count' is not used by --method trigger"):
        plan_jobs([], manifest, CLI_DEFAULTS, tree / "out")
    trigger_only = {**MANIFEST, "models": [{"model": "../vendor_a/model.onnx"}]}
    manifest.write_text(json.dumps(trigger_only))
    first = plan_jobs([], manifest, CLI_DEFAULTS, tree / "out")[0]
    assert first.options.method == "trigger" and first.options.settings.repair.mode == "auto"


def test_folders_expand_to_their_models_and_shared_stems_get_their_folder_name(tree, image_samples):
    jobs = plan_jobs([tree / "vendor_a", tree / "vendor_b"], None, {**CLI_DEFAULTS, "data": image_samples}, tree)
    assert [job.name for job in jobs] == ["vendor_a_model", "vendor_b_model"]
    assert [job.output.name for job in jobs] == ["vendor_a_model.onnx", "vendor_b_model.onnx"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"iterations": "ten"}, "'iterations' must be int"),
        ({"iterations": True}, "'iterations' must be int"),
        ({"alpha": 2}, "'alpha' must lie in 0..1"),
        ({"name": "../escape"}, "must be a plain file name"),
        ({"threshold": 0.1, "prune_fraction": 0.1}, "choose one of"),
        ({"learning_rate": 0.1}, "unknown keys learning_rate"),
    ],
)
def test_bad_manifest_entries_are_refused_naming_the_problem(tree, entry, message):
    manifest = tree / "config" / "batch.json"
    manifest.write_text(json.dumps([{"model": "../vendor_a/model.onnx", "data": "clean.npz", **entry}]))
    with pytest.raises(AnpError, match=message):
        plan_jobs([], manifest, CLI_DEFAULTS, tree / "out")


def test_two_models_writing_the_same_output_are_refused(tree, image_samples):
    manifest = tree / "config" / "batch.json"
    manifest.write_text(json.dumps([{"model": f"../vendor_{v}/model.onnx", "name": "same"} for v in "ab"]))
    with pytest.raises(AnpError, match="would both write"):
        plan_jobs([], manifest, {**CLI_DEFAULTS, "data": image_samples}, tree / "out")


def test_the_fingerprint_follows_file_contents_and_settings_not_paths(tree, image_samples):
    settings = {**CLI_DEFAULTS, "data": image_samples}
    job_a, job_b = plan_jobs([tree / "vendor_a", tree / "vendor_b"], None, settings, tree / "out")
    assert fingerprint(job_a) == fingerprint(job_b)  # same bytes in another folder
    changed = dataclasses.replace(job_a.options, settings=dataclasses.replace(job_a.options.settings, seed=1))
    assert fingerprint(dataclasses.replace(job_a, options=changed)) != fingerprint(job_a)
    (tree / "vendor_b" / "model.onnx").write_bytes(b"other")
    assert fingerprint(job_b) != fingerprint(job_a)
    missing = dataclasses.replace(job_a.options, test_data=tree / "missing.npz")
    assert fingerprint(dataclasses.replace(job_a, options=missing)) is None
