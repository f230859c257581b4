"""The defence benchmark end to end on a tiny grid: two MLPs the test trains itself on synthetic images (one
with a real BadNets backdoor, one clean), cached where the bench looks, then every measurement of the bench."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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
from tools.bench_defense import main  # noqa: E402
from tools.bench_grid import ALL_MODELS, BenchModel, is_ready, select  # noqa: E402
from tools.bench_report import auroc, comparison_lines, scan_summary  # noqa: E402
from tools.datasets import FASHION_MNIST_ROOT  # noqa: E402
from tools.train_backdoor import export_onnx, save_npz, to_input  # noqa: E402

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
    files = {"guided": "trigger", "anp": "anp", "fp": "fp", "clp": "clp"}
    for method, file in files.items():
        assert cell[method]["seconds"] > 0
        written = Evaluator(cache_dir / "purified" / f"badnets_mlp.{file}.onnx", "cpu").measure(test, poison)
        assert (written.acc, written.asr) == (cell[method]["acc"], cell[method]["asr"])
    assert cell["anp"]["iterations_run"] <= 20
    assert cell["scan"]["source"] == "purify's target search"  # the scan's own computation, run once
    assert cell["guided"]["guided"]["suspected_target"] == cell["scan"]["suspected_target"]
    assert cell["seconds"] >= sum(cell[method]["seconds"] for method in files)


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
    assert lines[0].startswith("- anp-onnx beats Fine-Pruning")
    assert lines[1].startswith("- anp-onnx does **not** beat CLP")  # lower ASR, but at a larger ACC drop
    assert comparison_lines({"fp": stats(2.0, 10.0)}) == []
