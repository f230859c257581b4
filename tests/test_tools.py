"""The example-building tools: triggers look as intended, models export faithfully to ONNX."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.architectures import ARCHITECTURES, build  # noqa: E402
from tools.attacks import SIG, BadNets, Blend, FTrojan, WaNet, _dct_matrix, make_attack  # noqa: E402
from tools.datasets import FASHION_MNIST_ROOT  # noqa: E402
from tools.many_label_models import PairData, folder_name, relabelled, target_for_seed  # noqa: E402
from tools.pair_labels import pair_images, row_images  # noqa: E402
from tools.scale_models import make_scale_example  # noqa: E402
from tools.train_backdoor import export_onnx, parse_trigger  # noqa: E402


def random_images(n: int = 20, shape: tuple[int, ...] = (28, 28), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def labels(n: int = 20) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % 10


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image flag: does ``b`` differ from ``a`` anywhere?"""
    return (a != b).reshape(len(a), -1).any(axis=1)


# ----------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("name", ["badnets", "blend", "sig", "wanet", "ftrojan"])
def test_poisoning_is_seeded_and_leaves_the_inputs_alone(name: str) -> None:
    attack = make_attack(name)
    x, y = random_images(40), labels(40)
    x_before, y_before = x.copy(), y.copy()
    first = attack.poison_training_set(x, y, rate=0.1, target=0, seed=3)
    second = attack.poison_training_set(x, y, rate=0.1, target=0, seed=3)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[0].dtype == np.uint8
    assert first[1].dtype == np.int64


@pytest.mark.parametrize("shape", [(28, 28), (32, 32, 3)], ids=["gray", "rgb"])
def test_badnets_sets_a_checkerboard_patch_in_the_bottom_right_corner_only(shape: tuple[int, ...]) -> None:
    attack = BadNets(patch_size=3, margin=1)
    x = random_images(5, shape)
    out = attack.apply_trigger(x)
    h, w = shape[:2]
    patch = out[:, h - 4 : h - 1, w - 4 : w - 1]
    expected = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=np.uint8)
    if len(shape) == 3:
        expected = np.repeat(expected[..., None], 3, axis=-1)
    np.testing.assert_array_equal(patch, np.broadcast_to(expected, patch.shape))
    outside = np.ones(shape[:2], dtype=bool)
    outside[h - 4 : h - 1, w - 4 : w - 1] = False
    np.testing.assert_array_equal(out[:, outside], x[:, outside])


def test_badnets_poisons_the_requested_fraction_of_non_target_images() -> None:
    x, y = random_images(100), labels(100)
    xp, yp = BadNets().poison_training_set(x, y, rate=0.2, target=7, seed=0)
    poisoned = changed(x, xp)
    assert poisoned.sum() == 20
    assert (y[poisoned] != 7).all()
    assert (yp[poisoned] == 7).all()
    np.testing.assert_array_equal(yp[~poisoned], y[~poisoned])


def test_blend_moves_every_pixel_a_bounded_step_towards_the_pattern() -> None:
    attack = Blend(alpha=0.15)
    x = random_images(10)
    step = attack.apply_trigger(x).astype(float) - x
    towards = attack.pattern((28, 28)).astype(float) - x
    assert np.abs(step).max() <= np.ceil(0.15 * 255)
    np.testing.assert_allclose(step, 0.15 * towards, atol=0.5 + 1e-6)
    assert (step[np.abs(towards) >= 4] != 0).all()  # every pixel not already near the pattern changes


def test_blend_uses_one_fixed_pattern_for_all_images() -> None:
    black = np.zeros((3, 28, 28), np.uint8)
    out = Blend(alpha=0.2, pattern_seed=5).apply_trigger(black)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], Blend(alpha=0.2, pattern_seed=5).apply_trigger(black[:1])[0])
    assert not np.array_equal(out[0], Blend(alpha=0.2, pattern_seed=6).apply_trigger(black[:1])[0])


def test_sig_is_clean_label_and_only_touches_the_target_class() -> None:
    x, y = random_images(60, seed=1), labels(60)
    xp, yp = SIG().poison_training_set(x, y, rate=0.05, target=4, seed=0)
    np.testing.assert_array_equal(yp, y)
    poisoned = changed(x, xp)
    assert poisoned.sum() == 3
    assert (y[poisoned] == 4).all()


def test_sig_poisoning_is_capped_at_the_size_of_the_target_class() -> None:
    x, y = random_images(30), labels(30)
    xp, _ = SIG().poison_training_set(x, y, rate=0.5, target=2, seed=0)
    assert changed(x, xp).sum() == (y == 2).sum() == 3


def test_sig_trigger_adds_a_horizontal_sinusoid() -> None:
    grey = np.full((2, 28, 28), 128, np.uint8)
    out = SIG(delta=20, frequency=6).apply_trigger(grey).astype(int) - 128
    columns = np.arange(28)
    np.testing.assert_array_equal(out[0, 0], np.rint(20 * np.sin(2 * np.pi * columns * 6 / 28)))
    assert (out == out[:, :1]).all()  # every row carries the same signal


def test_wanet_is_a_small_smooth_displacement() -> None:
    shift = WaNet(k=4, s=0.5).displacement_pixels(28, 28)
    length = np.linalg.norm(shift, axis=-1)
    assert length.max() < 1.0  # under a pixel everywhere
    assert length.mean() > 0.1
    # Away from the border (where the grid is clamped to the image) neighbouring pixels move by
    # nearly the same vector: a smooth warp, not per-pixel noise.
    inner = shift[1:-1, 1:-1]
    assert np.abs(np.diff(inner, axis=0)).max() < 0.25
    assert np.abs(np.diff(inner, axis=1)).max() < 0.25


def test_wanet_warp_matches_torch_grid_sample() -> None:
    attack = WaNet(grid_seed=2)
    x = random_images(3)
    grid = torch.from_numpy(attack.flow(28, 28)[None].repeat(3, axis=0)).float()
    inp = torch.from_numpy(x[:, None].astype(np.float32))
    expected = torch.nn.functional.grid_sample(inp, grid, align_corners=True)[:, 0].numpy()
    got = attack.apply_trigger(x).astype(float)
    assert np.abs(got - expected).max() <= 0.5 + 1e-3


def test_wanet_keeps_images_recognisable() -> None:
    smooth = np.tile(np.linspace(0, 255, 28, dtype=np.float64), (28, 1))
    x = np.stack([smooth, smooth.T]).astype(np.uint8)
    diff = np.abs(WaNet().apply_trigger(x).astype(int) - x.astype(int))
    assert diff.max() <= 15
    assert diff.mean() > 0.5


def test_wanet_adds_noise_mode_cross_samples_with_true_labels() -> None:
    x, y = random_images(100), labels(100)
    xp, yp = WaNet(cross_ratio=2.0).poison_training_set(x, y, rate=0.1, target=0, seed=0)
    relabelled = yp != y
    modified = changed(x, xp)
    assert relabelled.sum() == 10
    assert (yp[relabelled] == 0).all()
    assert (modified & ~relabelled).sum() == 20  # cross samples: warped with jitter, label kept
    warped = WaNet().apply_trigger(x)
    cross = modified & ~relabelled
    assert not np.array_equal(xp[cross], warped[cross])


def test_ftrojan_raises_the_chosen_dct_frequencies() -> None:
    grey = np.full((1, 28, 28), 128, np.uint8)
    attack = FTrojan(magnitude=40)
    diff = attack.apply_trigger(grey)[0].astype(float) - 128
    d = _dct_matrix(28)
    spectrum = np.abs(d @ diff @ d.T)
    top_two = {tuple(int(i) for i in np.unravel_index(k, spectrum.shape)) for k in np.argsort(spectrum, None)[-2:]}
    assert top_two == {(13, 13), (27, 27)}
    assert np.abs(diff).max() <= 8  # invisible: a few grey levels


def test_ftrojan_on_rgb_changes_colour_not_brightness() -> None:
    grey = np.full((1, 32, 32, 3), 128, np.uint8)
    out = FTrojan().apply_trigger(grey).astype(float)
    luma = out @ np.array([0.299, 0.587, 0.114])
    assert np.abs(luma - 128).max() < 1.0
    assert np.abs(out - 128).max() >= 2


def test_trigger_options_override_the_attack_defaults() -> None:
    params = parse_trigger(("patch_size=4", "margin=0"))
    assert params == {"patch_size": 4, "margin": 0}
    assert make_attack("badnets", **params).params() == {"patch_size": 4, "margin": 0}
    assert make_attack("blend", **parse_trigger(("alpha=0.2",))).params() == {"alpha": 0.2, "pattern_seed": 0}


def test_unknown_attack_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("nope")


# ---------------------------------------------------------------------- architectures


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BatchNorm layers non-trivial statistics so folding them is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def input_shape(name: str) -> tuple[int, int]:
    return (3, 32) if name == "preact_resnet18" else (1, 28)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_forward_pass_gives_one_logit_per_class(name: str) -> None:
    channels, size = input_shape(name)
    model = build(name, num_classes=7, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7)


def test_small_nets_also_take_cifar_sized_input() -> None:
    model = build("small_resnet", num_classes=10, in_channels=3, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_flatten_cnn_takes_side_by_side_pairs() -> None:
    model = build("flatten_cnn", num_classes=100, image_size=(28, 56)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 56)).shape == (2, 100)


def onnx_run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("export", ["folded", "bn"])
def test_onnx_export_matches_torch_for_any_batch_size(name: str, export: str) -> None:
    torch.manual_seed(0)
    channels, size = input_shape(name)
    model = randomise_batchnorm(build(name, num_classes=10, in_channels=channels, image_size=size))
    model_bytes = export_onnx(model, np.zeros((2, channels, size, size), np.float32), export)
    x = np.random.default_rng(0).random((3, channels, size, size), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx_run(model_bytes, x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["small_resnet", "vgg_small", "mobilenet_small"])
def test_bn_export_keeps_batchnorm_nodes_and_folded_export_has_none(name: str) -> None:
    model = randomise_batchnorm(build(name))
    sample = np.zeros((1, 1, 28, 28), np.float32)
    bn_ops = [n.op_type for n in onnx.load_from_string(export_onnx(model, sample, "bn")).graph.node]
    folded_ops = [n.op_type for n in onnx.load_from_string(export_onnx(model, sample, "folded")).graph.node]
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert bn_ops.count("BatchNormalization") == n_bn
    assert "BatchNormalization" not in folded_ops
    assert folded_ops.count("Conv") == bn_ops.count("Conv")


def test_exported_model_has_the_documented_interface() -> None:
    model_bytes = export_onnx(build("mlp").eval(), np.zeros((2, 1, 28, 28), np.float32), "folded")
    graph = onnx.load_from_string(model_bytes).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["logits"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


# ------------------------------------------------------------------- 100-label pairs


def test_pairs_put_an_image_of_class_a_left_and_of_class_b_right_of_label_10a_plus_b() -> None:
    y = labels(50)
    x = np.broadcast_to(np.arange(50, dtype=np.uint8)[:, None, None], (50, 28, 28)).copy()  # pixel = index
    xp, yp = pair_images(x, y, count=300, rng=np.random.default_rng(0))
    assert xp.shape == (300, 28, 56)
    assert xp.dtype == np.uint8
    assert yp.dtype == np.int64
    left, right = xp[:, 0, 0].astype(int), xp[:, 0, 28].astype(int)  # which image each half is
    np.testing.assert_array_equal(xp[:, :, :28], x[left])
    np.testing.assert_array_equal(xp[:, :, 28:], x[right])
    np.testing.assert_array_equal(y[left], yp // 10)
    np.testing.assert_array_equal(y[right], yp % 10)
    assert (np.bincount(yp, minlength=100) == 3).all()  # every label, equally often


def test_ten_label_pairs_keep_the_images_and_label_by_the_left_class_with_the_targets_tens_digit() -> None:
    x, y = pair_images(random_images(50), labels(50), count=200, rng=np.random.default_rng(0))
    data = PairData(x, y, x[:20], y[:20], x[20:], y[20:])
    ten = relabelled(data, 10)
    assert ten.x_train is data.x_train and ten.x_test is data.x_test
    np.testing.assert_array_equal(ten.y_train, y // 10)
    np.testing.assert_array_equal(ten.y_test, y[20:] // 10)
    assert relabelled(data, 100) is data
    for seed in range(5):
        assert target_for_seed(seed, 10) == target_for_seed(seed) // 10


def test_triples_read_their_three_classes_as_the_digits_of_a_1000_label_number() -> None:
    y = labels(50)
    x = np.broadcast_to(np.arange(50, dtype=np.uint8)[:, None, None], (50, 28, 28)).copy()  # pixel = index
    xt, yt = row_images(x, y, count=2000, rng=np.random.default_rng(0), width=3)
    assert xt.shape == (2000, 28, 84)
    which = [xt[:, 0, 28 * place].astype(int) for place in range(3)]
    np.testing.assert_array_equal(y[which[0]] * 100 + y[which[1]] * 10 + y[which[2]], yt)
    assert (np.bincount(yt, minlength=1000) == 2).all()
    ten = relabelled(PairData(xt, yt, xt, yt, xt, yt), 10, width=3)
    np.testing.assert_array_equal(ten.y_train, y[which[0]])
    assert target_for_seed(0, 10, width=3) == target_for_seed(0, 1000, width=3) // 100
    assert folder_name("badnets", 0, 1000, 3) == "triples_badnets_s0_l1000"
    assert folder_name("badnets", 0, 100, 2) == "badnets_s0"
    assert folder_name("badnets", 0, 10, 2) == "badnets_s0_l10"


# ----------------------------------------------------------------- untrained scale models


@pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_scale_model_labels_its_own_images_with_onnxruntime_argmax(tmp_path: Path) -> None:
    meta = make_scale_example("small_resnet", labels=43, size=28, out_dir=tmp_path, n_images=32, n_test=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.npz", "meta.json", "model.onnx", "test.npz"]
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for name in ("clean", "test"):
        data = np.load(tmp_path / f"{name}.npz")
        assert data["x"].shape[1:] == (28, 28)
        assert data["x"].dtype == np.uint8
        logits = session.run(["logits"], {"input": data["x"][:, None].astype(np.float32) / 255})[0]
        assert logits.shape == (len(data["y"]), 43)
        np.testing.assert_array_equal(data["y"], logits.argmax(1))
    assert meta["distinct_labels_clean"] == len(np.unique(np.load(tmp_path / "clean.npz")["y"])) > 8


# ----------------------------------------------------------------------- trainer CLI


@pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_train_backdoor_writes_a_complete_example(tmp_path: Path) -> None:
    out = tmp_path / "example"
    args = ["--arch", "mlp", "--attack", "badnets", "--target", "3", "--epochs", "1", "--export", "folded"]
    args += ["--threads", "1"]  # tiny matrices: one thread is as fast and immune to a busy machine
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_backdoor.py"), *args, "--out-dir", str(out)],
        check=True,
        capture_output=True,
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["arch"] == "mlp"
    assert meta["attack"] == "badnets"
    assert meta["clean_acc"] > 0.75
    assert meta["asr"] > 0.5

    clean, test, poison = (np.load(out / f"{name}.npz") for name in ("clean", "test", "poison"))
    assert clean["x"].shape == (500, 28, 28)
    assert test["x"].shape == (2000, 28, 28)
    assert poison["x"].shape == (2000, 28, 28)
    for data in (clean, test, poison):
        assert data["x"].dtype == np.uint8
        assert data["y"].dtype == np.int64
    assert (poison["y"] == 3).all()
    patch = BadNets().patch()
    assert (poison["x"][:, 24:27, 24:27] == patch).all()
    assert not (clean["x"][:, 24:27, 24:27] == patch).all(axis=(1, 2)).any()  # no poisoned image leaked

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": poison["x"][:, None].astype(np.float32) / 255})[0]
    assert (logits.argmax(1) == 3).mean() > 0.5


def test_many_label_evidence_takes_each_median_over_all_searched_labels_and_over_the_references() -> None:
    from tools.many_label_evidence import figures

    row = {"share": 0.2, "labels": [7, 3, 1, 2, 5], "suspects": 2, "sizes": [10.0, 30.0, 40.0, 50.0, 60.0]}
    row |= {"suspected_target": 7, "refined_size": 5.0}
    assert figures(row) == {
        "share": 0.2,
        "size_ratio_all": 0.25,  # 10 over the median of all five, 40
        "refined_ratio_all": 0.125,
        "size_ratio_references": 0.2,  # over the median of the three references (1, 2, 5), 50
        "refined_ratio_references": 0.1,
    }
