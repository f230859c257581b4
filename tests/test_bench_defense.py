"""The defence benchmark end to end on a tiny grid: two MLPs the test trains itself on synthetic images (one
with a real BadNets backdoor, one clean), cached where the bench looks, then every measurement of the bench."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anp_onnx.data import load_samples  # noqa: E402
from anp_onnx.onnx.model import input_shape, load_model  # noqa: E402
from anp_onnx.validate.evaluate import Evaluator  # noqa: E402
from tools.architectures import mlp  # noqa: E402
from tools.attacks import BadNets  # noqa: E402
from tools.bench_defense import ExternalModel, main  # noqa: E402
from tools.bench_grid import ALL_MODELS, BenchModel, is_ready, select  # noqa: E402
from tools.bench_report import (  # noqa: E402
    VERDICTS,
    auroc,
    clean_table,
    comparison_lines,
    cost_lines,
    cost_summary,
    defence_table,
    failing_lines,
    failure_reason,
    method_summary,
    scan_summary,
    summary_lines,
)
from tools.datasets import FASHION_MNIST_ROOT  # noqa: E402
from tools.example_files import save_npz  # noqa: E402
from tools.train_backdoor import export_onnx, to_input  # noqa: E402

EPOCHS = 1  # the recipe the cached test models claim (the bench retrains anything else)
MODELS = {model.name: model for model in ALL_MODELS}


def synthetic_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten classes: a bright 6x6 block at a class-specific place on a noisy 28x28 background."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, count)
    x = rng.integers(0, 60, size=(count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(y):
        row, col = 2 + 8 * (label // 4), 2 + 6 * (label % 4)
        x[index, row : row + 6, col : col + 6] = 220
    return x, y.astype(np.int64)


def train_cached_model(model: BenchModel, cache_dir: Path) -> None:
    """Train `model` on synthetic data (a second or two) and write it as the bench's cache holds it."""
    attack = BadNets()
    x, y = synthetic_images(3000, seed=model.seed)
    x_used, y_used = (x, y) if model.attack is None else attack.poison_training_set(x, y, 0.1, model.target, 0)
    torch.manual_seed(model.seed)
    net = mlp()
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    inputs, labels = torch.from_numpy(to_input(x_used)), torch.from_numpy(y_used)
    for _ in range(4):
        for start in range(0, len(inputs), 64):
            loss = torch.nn.functional.cross_entropy(net(inputs[start : start + 64]), labels[start : start + 64])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()
    folder = cache_dir / model.name
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(export_onnx(net, to_input(x[:2]), model.export))
    untouched = (x_used == x).reshape(len(x), -1).all(axis=1) & (y_used == y)
    clean = np.flatnonzero(untouched)[:300]
    save_npz(folder / "clean.npz", x[clean], y[clean])
    x_test, y_test = synthetic_images(400, seed=model.seed + 100)
    save_npz(folder / "test.npz", x_test, y_test)
    victims = y_test != model.target
    save_npz(folder / "poison.npz", attack.apply_trigger(x_test[victims]), np.full(victims.sum(), model.target))
    meta = {
        "arch": model.arch,
        "attack": model.attack,
        "export": model.export,
        "seed": model.seed,
        "target": model.target,
        "poison_rate": model.poison_rate if model.attack else 0.0,
        "epochs": EPOCHS,
        "clean_acc": None,
        "asr": None,
        "train_seconds": 1.0,
    }
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("bench")
    cache_dir, out_dir = root / "cache", root / "out"
    for name in ("badnets_mlp", "clean_mlp"):
        train_cached_model(MODELS[name], cache_dir)
    arguments = ["--cells", "badnets_mlp,clean_mlp", "--iterations", "20", "--epochs", str(EPOCHS)]
    arguments += ["--methods", "guided,anp,fp,clp"]
    arguments += ["--cache-dir", str(cache_dir), "--out", str(out_dir), "--device", "cpu"]
    outcome = CliRunner().invoke(main, arguments, catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    return cache_dir, out_dir, json.loads((out_dir / "results.json").read_text())


def test_bench_measures_every_defence_on_the_backdoored_model(bench_run: tuple[Path, Path, dict]) -> None:
    cache_dir, _, results = bench_run
    (cell,) = results["cells"]
    assert cell["name"] == "badnets_mlp" and cell["target"] == MODELS["badnets_mlp"].target
    assert cell["before"]["acc"] > 0.9 and cell["before"]["asr"] > 0.9  # a real backdoor to remove
    folder = cache_dir / "badnets_mlp"
    model = load_model(folder / "model.onnx")
    test = load_samples(folder / "test.npz", input_shape(model))
    poison = load_samples(folder / "poison.npz", input_shape(model))
    files = {"guided": "trigger", "pruning": "pruning", "anp": "anp", "fp": "fp", "clp": "clp"}
    for method, file in files.items():
        assert cell[method]["seconds"] > 0
        written = Evaluator(cache_dir / "purified" / f"badnets_mlp.{file}.onnx", "cpu").measure(test, poison)
        assert (written.acc, written.asr) == (cell[method]["acc"], cell[method]["asr"])
    assert cell["anp"]["iterations_run"] <= 20
    assert cell["scan"]["source"] == "purify's target search"  # the scan's own computation, run once
    assert cell["guided"]["guided"]["suspected_target"] == cell["scan"]["suspected_target"]
    ran_apart = [method for method in files if method != "pruning"]  # pruning only is the guided run's
    assert cell["seconds"] >= sum(cell[method]["seconds"] for method in ran_apart)


def test_pruning_only_and_the_repair_come_from_the_one_default_purify_run(bench_run: tuple[Path, Path, dict]) -> None:
    cache_dir, _, results = bench_run
    (cell,) = results["cells"]
    guided, pruning = cell["guided"], cell["pruning"]
    repair, timings = guided["repair"], guided["timings_s"]
    assert guided["verdict"]["name"] in VERDICTS and guided["verdict"]["reason"]
    assert pruning["pruned"] == repair["method_pruned"] and pruning["criterion"]
    assert repair["seconds"] == round(timings["repair"], 3)
    assert repair["pruning_stage_seconds"] == round(timings["optimise"], 3)
    assert repair["ratio_to_pruning"] == round(timings["repair"] / timings["optimise"], 4)
    assert pruning["seconds"] == round(sum(s for stage, s in timings.items() if stage != "repair"), 3)
    purified = load_model(cache_dir / "purified" / "badnets_mlp.trigger.onnx")
    pruned = load_model(cache_dir / "purified" / "badnets_mlp.pruning.onnx")
    differ = [
        a.name
        for a, b in zip(purified.graph.initializer, pruned.graph.initializer, strict=True)
        if a.raw_data != b.raw_data
    ]
    if repair["ran"] and repair["changed_initializers"]:  # repair replaced the pruning with changed weights
        assert guided["pruned"] == 0 and guided["criterion"].startswith("repair:")
        assert repair["max_relative_change"] > 0 and differ
    else:  # the written model is the pruned one
        assert repair["changed_initializers"] == 0 and guided["pruned"] == pruning["pruned"]
        assert (guided["acc"], guided["asr"]) == (pruning["acc"], pruning["asr"]) and not differ


def test_the_clean_model_gets_the_default_purify_its_verdict_and_the_plain_statement(
    bench_run: tuple[Path, Path, dict],
) -> None:
    cache_dir, out_dir, results = bench_run
    (clean,) = results["clean_models"]
    guided = clean["guided"]
    folder = cache_dir / "clean_mlp"
    test = load_samples(folder / "test.npz", input_shape(load_model(folder / "model.onnx")))
    written = Evaluator(cache_dir / "purified" / "clean_mlp.trigger.onnx", "cpu").measure(test, None)
    assert written.acc == guided["acc"] and guided["asr"] is None
    assert guided["acc_change_points"] == round(100 * (guided["acc"] - clean["before"]["acc"]), 4)
    assert guided["unchanged"] == (guided["acc"] == clean["before"]["acc"])
    assert guided["verdict_name"] == guided["verdict"]["name"] in VERDICTS
    assert clean["scan"]["source"] == "purify's target search"
    text = (out_dir / "RESULTS.md").read_text()
    assert "## Clean models: the default purify" in text and "## Cost: repair beside pruning" in text
    ok = guided["verdict_name"] == "clean" and guided["unchanged"]
    assert ok == results["clean_summary"]["all_clean_and_unchanged"]
    statement = "Every one of the 1 clean models gets verdict `clean` with its ACC unchanged."
    assert (statement in text) == ok and ("**Not** every clean model" in text) == (not ok)


def test_bench_scores_both_models_and_derives_auroc_and_hit_rate(bench_run: tuple[Path, Path, dict]) -> None:
    _, _, results = bench_run
    (cell,), (clean,) = results["cells"], results["clean_models"]
    assert clean["name"] == "clean_mlp" and clean["scan"] and "anp" not in clean
    summary = results["scan_summary"]
    assert summary["auroc"] == (1.0 if cell["scan"]["score"] > clean["scan"]["score"] else 0.0)
    assert summary["target_hit_rate"] == float(cell["scan"]["suspected_target"] == cell["target"])


def test_rescan_measures_the_scan_again_and_keeps_the_defence_numbers(
    bench_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    cache_dir, out_dir, results = bench_run
    copy = tmp_path / "out"
    shutil.copytree(out_dir, copy)
    arguments = ["--rescan", "--cells", "badnets_mlp", "--epochs", str(EPOCHS), "--device", "cpu"]
    outcome = CliRunner().invoke(main, [*arguments, "--cache-dir", str(cache_dir), "--out", str(copy)])
    assert outcome.exit_code == 0, outcome.output
    again = json.loads((copy / "results.json").read_text())
    assert again["scan_remeasured"]["command"].startswith("tools/bench_defense.py")
    (cell,), (clean,) = again["cells"], again["clean_models"]
    assert cell["guided"] == results["cells"][0]["guided"] and cell["fp"] == results["cells"][0]["fp"]
    first = results["cells"][0]["scan"]
    for key in ("trigger_sizes", "score", "suspected_target", "target_share", "size_ratio", "error_rate"):
        assert cell["scan"][key] == first[key]  # `anp-onnx scan` measures what purify's target search measured
    assert clean["scan"]["seconds"] > 0 and "measured again by" in (copy / "RESULTS.md").read_text()


def test_cells_measured_in_worker_processes_give_the_same_tables(
    bench_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    cache_dir, _, results = bench_run
    arguments = ["--cells", "badnets_mlp,clean_mlp", "--epochs", str(EPOCHS), "--methods", "fp,clp", "--no-scan"]
    arguments += ["--cache-dir", str(cache_dir), "--out", str(tmp_path), "--device", "cpu", "--jobs", "2"]
    outcome = CliRunner().invoke(main, arguments, catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    again = json.loads((tmp_path / "results.json").read_text())
    assert [cell["name"] for cell in again["cells"]] == ["badnets_mlp"]
    assert [cell["name"] for cell in again["clean_models"]] == ["clean_mlp"]
    for method in ("fp", "clp"):
        measured = {key: again["cells"][0][method][key] for key in ("acc", "asr", "pruned")}
        assert measured == {key: results["cells"][0][method][key] for key in ("acc", "asr", "pruned")}
    assert (tmp_path / "RESULTS.md").is_file()


def test_bench_writes_the_tables_and_the_threshold_figure(bench_run: tuple[Path, Path, dict]) -> None:
    _, out_dir, results = bench_run
    text = (out_dir / "RESULTS.md").read_text()
    cell = results["cells"][0]
    row = f"| mlp | badnets | folded | 8 | {100 * cell['before']['acc']:.2f} | {100 * cell['before']['asr']:.2f} |"
    assert row in text
    assert f"Detection AUROC (backdoored vs clean, by score) **{results['scan_summary']['auroc']:.3f}**" in text
    assert results["plot"]["cell"] == "badnets_mlp"
    assert [point["threshold"] for point in results["plot"]["points"]][:3] == [0.0, 0.1, 0.2]
    assert (out_dir / results["plot"]["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the grid and the write-up


def test_the_grid_covers_every_attack_on_resnet_in_both_exports_and_every_architecture() -> None:
    resnet = {(m.attack, m.export) for m in ALL_MODELS if m.arch == "small_resnet" and m.backdoored}
    attacks = {"badnets", "blend", "sig", "wanet", "ftrojan"}
    assert resnet == {(attack, export) for attack in attacks for export in ("bn", "folded")}
    for arch in ("small_resnet", "vgg_small", "mobilenet_small", "mlp"):
        assert {m.attack for m in ALL_MODELS if m.arch == arch} >= {"badnets", "blend", None}
    assert len({m.name for m in ALL_MODELS}) == len(ALL_MODELS)
    pairs = [m for m in ALL_MODELS if m.arch == "small_resnet"]
    for model in pairs:  # the two export styles of a resnet are one training run
        assert sum(other.training_key == model.training_key for other in pairs) == 2


def test_a_cached_model_with_another_recipe_is_not_reused(tmp_path: Path) -> None:
    model = MODELS["badnets_mlp"]
    train_cached_model(model, tmp_path)
    assert is_ready(model, tmp_path, EPOCHS)
    assert not is_ready(model, tmp_path, EPOCHS + 2)
    meta = json.loads((tmp_path / model.name / "meta.json").read_text())
    (tmp_path / model.name / "meta.json").write_text(json.dumps({**meta, "target": model.target + 1}))
    assert not is_ready(model, tmp_path, EPOCHS)


def test_select_matches_name_fragments_and_refuses_unknown_ones() -> None:
    assert [m.name for m in select(["mlp"])] == ["badnets_mlp", "blend_mlp", "clean_mlp"]
    with pytest.raises(SystemExit, match="no benchmark model matches"):
        select(["transformer"])


def test_auroc_counts_ties_as_half_and_needs_both_sides() -> None:
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5, 0.9], [0.5]) == 0.75
    assert auroc([0.5], []) is None
    cells = [{"scan": {"score": 0.9, "suspected_target": 3}, "target": 3}]
    cells.append({"scan": {"score": 0.2, "suspected_target": 1}, "target": 0})
    summary = scan_summary(cells, [{"scan": {"score": 0.5}}])
    assert (summary["auroc"], summary["target_hit_rate"]) == (0.5, 0.5)


@pytest.mark.slow
@pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_trainer_folded_copy_is_the_same_weights_exported_with_batch_norm_folded(tmp_path: Path) -> None:
    """One training run, two exports: BatchNormalization nodes kept, and folded into Conv, same outputs."""
    kept, folded = tmp_path / "kept", tmp_path / "folded"
    args = ["--arch", "mobilenet_small", "--attack", "badnets", "--epochs", "1", "--threads", "1", "--export", "bn"]
    args += ["--out-dir", str(kept), "--folded-copy-dir", str(folded)]
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_backdoor.py"), *args],
        check=True,
        capture_output=True,
    )
    metas = [json.loads((folder / "meta.json").read_text()) for folder in (kept, folded)]
    assert [meta["export"] for meta in metas] == ["bn", "folded"]
    assert metas[0]["batchnorm_nodes"] > 0 and metas[1]["batchnorm_nodes"] == 0
    for name in ("clean.npz", "test.npz", "poison.npz"):
        assert (kept / name).read_bytes() == (folded / name).read_bytes()
    x = load_samples(kept / "test.npz", (None, 1, 28, 28)).x[:256]
    outputs = [Evaluator(folder / "model.onnx", "cpu").outputs(x) for folder in (kept, folded)]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)


def test_the_comparison_says_plainly_when_anp_does_not_beat_a_baseline() -> None:
    def stats(drop: float, asr: float) -> dict[str, float]:
        return {"mean_acc_drop_points": drop, "mean_asr_percent": asr}

    lines = comparison_lines({"guided": stats(1.0, 2.0), "fp": stats(2.0, 10.0), "clp": stats(0.5, 50.0)})
    assert lines[0].startswith("- anp-onnx (prune + repair) beats Fine-Pruning")
    assert lines[1].startswith("- anp-onnx (prune + repair) does **not** beat CLP")  # lower ASR, larger ACC drop
    assert comparison_lines({"fp": stats(2.0, 10.0)}) == []


# ----------------------------------------------------------------------------- the write-up on hand-made entries


def hand_cell(name: str, guided: tuple[float, float, str, bool], pruning: tuple[float, float], fp: float) -> dict:
    """A backdoored cell as bench_defense records it: ACC 0.90 / ASR 1.0 before; guided's (ACC, ASR, verdict,
    repair ran), pruning only's (ACC, ASR), Fine-Pruning's ASR at ACC 0.89."""
    acc, asr, verdict, ran = guided
    repair = {"ran": ran, "why": "test", "changed_initializers": 3 if ran else 0, "max_relative_change": 0.1 * ran}
    repair.update(method_pruned=2, seconds=4.0 if ran else 1.0, pruning_stage_seconds=8.0)
    repair["ratio_to_pruning"] = repair["seconds"] / 8.0
    return {
        "name": name,
        "arch": "mlp",
        "attack": "badnets",
        "export": "folded",
        "target": 0,
        "before": {"acc": 0.90, "asr": 1.0},
        "guided": {"acc": acc, "asr": asr, "pruned": 0, "verdict": {"name": verdict}, "repair": repair},
        "pruning": {"acc": pruning[0], "asr": pruning[1], "pruned": 2},
        "fp": {"acc": 0.89, "asr": fp, "pruned": 5},
    }


HAND_CELLS = [
    hand_cell("a_mlp", (0.88, 0.01, "purified", True), (0.85, 0.60), 0.9),  # repair reaches the targets
    hand_cell("b_mlp", (0.87, 0.05, "purified", False), (0.87, 0.05), 0.02),  # pruning did, at the edges
    hand_cell("c_mlp", (0.80, 0.02, "purified", True), (0.86, 0.90), 0.9),  # ACC drop 10: purified but failing
    hand_cell("d_mlp", (0.89, 0.70, "residual", True), (0.89, 0.95), 0.9),
]


def test_the_summary_counts_cells_meeting_the_targets_and_the_verdicts_per_method() -> None:
    summary = method_summary(HAND_CELLS)
    assert [summary[m]["cells_meeting_targets"] for m in ("guided", "pruning", "fp")] == [2, 1, 1]
    assert summary["guided"]["verdicts"] == {"purified": 3, "residual": 1, "clean": 0}
    assert summary["guided"]["repaired"] == 3 and "verdicts" not in summary["pruning"]
    assert [cell["name"] for cell in summary["guided"]["failing_cells"]] == ["c_mlp", "d_mlp"]
    assert summary["guided"]["purified_but_failing"] == ["c_mlp"]
    (line,) = [line for line in summary_lines(summary) if line.startswith("- anp-onnx (prune + repair):")]
    assert "**2 of 4** cells meet ASR <= 5% with ACC drop <= 3 points" in line
    assert "verdicts: 3 purified, 1 residual, 0 clean; repair changed weights in 3" in line
    heading, c_line, d_line, mismatch = failing_lines(summary)
    assert heading.startswith("- Cells still outside the targets with anp-onnx (prune + repair), and why")
    assert c_line.startswith("  - `c_mlp` (ACC drop 10.00, ASR 2.00%, verdict purified)")
    assert d_line.startswith("  - `d_mlp` (ACC drop 1.00, ASR 70.00%, verdict residual)")
    assert "a_mlp" not in heading + c_line + d_line
    assert mismatch == "- Verdict `purified` although the measured ASR or ACC misses the targets: `c_mlp`."
    assert failing_lines(method_summary(HAND_CELLS[:2])) == [
        "- Every cell meets the targets with anp-onnx (prune + repair)."
    ]


def test_a_failing_cell_says_why_from_purifys_own_record() -> None:
    evidence = "no backdoor evidence: score 0.388 (evidence from 0.45)"
    missed = {"guided": {"backdoor_evidence": False, "evidence": evidence}, "verdict": {"reason": "x"}}
    assert failure_reason(missed) == evidence
    stopped = {
        "guided": {"backdoor_evidence": True},
        "verdict": {"reason": "synthetic trigger for label 0 still succeeds on 9.0% of clean inputs"},
        "repair": {
            "ran": True,
            "stopped_because": "3 backtracks",
            "held_out_accuracy": 0.88,
            "held_out_accuracy_reference": 0.91,
        },
    }
    assert failure_reason(stopped) == (
        "synthetic trigger for label 0 still succeeds on 9.0% of clean inputs; repair stopped: 3 backtracks; "
        "held-out accuracy 91.0 -> 88.0"
    )
    skipped = {"verdict": {"reason": "r"}, "repair": {"ran": False, "why": "--repair never"}}
    assert failure_reason(skipped) == "r; repair did not run: --repair never"


def test_the_defence_table_has_pruning_only_and_the_verdict_columns_and_skips_methods_not_run() -> None:
    header, _, first, *_, average = defence_table(HAND_CELLS)
    columns = [column.strip() for column in header.strip("|").split("|")]
    assert columns[4:] == [
        "No defence ACC", "ASR", "anp-onnx (prune + repair) ACC", "ASR", "verdict", "repaired",
        "pruning only ACC", "ASR", "Fine-Pruning ACC", "ASR",
    ]  # fmt: skip
    expected = "| mlp | badnets | folded | 0 | 90.00 | 100.00 | 88.00 | 1.00 | purified | yes |"
    assert first == expected + " 85.00 | 60.00 | 89.00 | 90.00 |"
    assert "| 3 purified, 1 residual, 0 clean | 3 repaired |" in average


def test_the_cost_is_repair_over_the_same_runs_pruning_stage() -> None:
    cost = cost_summary(HAND_CELLS)
    assert cost["mean_ratio"] == round((0.5 + 0.125 + 0.5 + 0.5) / 4, 3) and cost["max_ratio"] == 0.5
    assert (cost["repaired_cells"], cost["mean_ratio_repaired"]) == (3, 0.5)
    (line,) = cost_lines(HAND_CELLS)
    assert "mean **0.41** (worst 0.50) over 4 cells; 0.50 over the 3 cells where repair trained" in line
    assert cost_lines([]) == []


def test_the_clean_table_says_plainly_whether_every_clean_model_is_clean_and_unchanged() -> None:
    def model(name: str, after: float, verdict: str) -> dict:
        result = {"acc": after, "verdict": {"name": verdict}, "acc_change_points": round(100 * (after - 0.9), 4)}
        return {"name": name, "before": {"acc": 0.9}, "guided": {**result, "unchanged": after == 0.9}}

    lines = clean_table([model("clean_mlp", 0.9, "clean"), model("clean_vgg", 0.9, "clean")])
    assert "| clean_mlp | 90.00 | 90.00 | +0.00 | clean |" in lines
    assert lines[-1] == "Every one of the 2 clean models gets verdict `clean` with its ACC unchanged."
    lines = clean_table([model("clean_mlp", 0.9, "clean"), model("clean_vgg", 0.885, "purified")])
    assert "| clean_vgg | 90.00 | 88.50 | -1.50 | purified |" in lines
    assert lines[-1].startswith("**Not** every clean model gets verdict `clean` with its ACC unchanged: `clean_vgg`")
    assert clean_table([{"name": "clean_mlp", "before": {"acc": 0.9}}])[0].startswith("No clean model purified")


def test_a_model_made_elsewhere_is_read_from_its_folder_and_a_missing_file_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "keras_softmax"
    folder.mkdir()
    for name in ("model.onnx", "clean.npz", "test.npz", "poison.npz"):
        (folder / name).write_bytes(b"")
    meta = {"arch": "keras_cnn_softmax", "attack": "badnets", "target": 0, "export": "tf2onnx 1.16.1, opset 15"}
    (folder / "meta.json").write_text(json.dumps(meta))
    model = ExternalModel.read(folder)
    assert (model.name, model.arch, model.attack, model.export, model.target) == (
        "keras_softmax",
        "keras_cnn_softmax",
        "badnets",
        "tf2onnx 1.16.1",
        0,
    )
    assert model.backdoored and model.folder(tmp_path / "cache", 3) == folder
    (folder / "poison.npz").unlink()
    with pytest.raises(click.BadParameter, match=r"lacks poison\.npz"):
        ExternalModel.read(folder)
