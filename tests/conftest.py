"""Real models for the tests: small torch nets exported to ONNX both ways, and graphs written with onnx.helper."""

from __future__ import annotations

import signal
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

INPUT_SHAPE = (1, 16, 16)


class SmallCnn(nn.Module):
    """Conv-BN-ReLU twice, a hidden Linear and a Linear head: every neuron kind in one net."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 12),
            nn.ReLU(),
            nn.Linear(12, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def small_cnn(seed: int = 0) -> SmallCnn:
    """Random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = SmallCnn()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    first_batch_norm = model.features[1]
    # Equal tensors make the TorchScript exporter deduplicate them into Identity nodes, as it does
    # for every freshly initialised BatchNorm (weight == running_var == 1): the case onnx2torch fails on.
    first_batch_norm.running_var.copy_(first_batch_norm.weight.data)
    return model.eval()


def export(model: nn.Module, path: Path, keep_batch_norm: bool, input_shape=INPUT_SHAPE) -> Path:
    """TorchScript export; eval mode folds BatchNorm into Conv, PRESERVE keeps it (with Identity nodes)."""
    training = torch.onnx.TrainingMode.PRESERVE if keep_batch_norm else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(2, *input_shape),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
            training=training,
        )
    return path


def matmul_mlp(path: Path, seed: int = 0) -> Path:
    """An MLP as TensorFlow exporters write it: MatMul with [in, out] weights plus Add, one MatMul without bias."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h1"], name="dense1/MatMul"),
        helper.make_node("Add", ["h1", "b1"], ["a1"], name="dense1/Add"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="dense2/MatMul"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["h3"], name="head/MatMul"),
        helper.make_node("Add", ["h3", "b3"], ["logits"], name="head/Add"),
    ]
    initializers = [weight("w1", 20, 16), weight("b1", 16), weight("w2", 16, 12), weight("w3", 12, 5), weight("b3", 5)]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 20])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test", ir_version=8)
    onnx.save(model, str(path))
    return path


def random_samples(path: Path, count: int, shape: tuple[int, ...], classes: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.random((count, *shape), dtype=np.float32), y=rng.integers(0, classes, count))
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "folded": export(small_cnn(), folder / "folded.onnx", keep_batch_norm=False),
        "batchnorm": export(small_cnn(), folder / "batchnorm.onnx", keep_batch_norm=True),
        "matmul": matmul_mlp(folder / "matmul.onnx"),
    }


@pytest.fixture(scope="session")
def image_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_samples(tmp_path_factory.mktemp("data") / "images.npz", 64, INPUT_SHAPE, classes=4)


@pytest.fixture(scope="session")
def vector_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_samples(tmp_path_factory.mktemp("data") / "vectors.npz", 64, (20,), classes=5)


def default_sigint() -> None:
    """preexec_fn for children that a test interrupts: SIGINT back to its default, so Python turns it
    into KeyboardInterrupt even when the suite itself was started with SIGINT ignored (`cmd &` in a
    non-interactive shell), which children would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="session")
def calibrated_example():
    """A function: the bundled example `name` (tools/make_examples.py) imported and calibrated as purify
    does it, with its clean samples as tensors: (classifier, x, y). A fresh classifier each call."""
    from anp_onnx.bridge.importer import import_model
    from anp_onnx.data import load_samples
    from anp_onnx.methods import anp
    from anp_onnx.methods.anp import AnpSettings
    from anp_onnx.onnx.model import input_shape
    from anp_onnx.pipeline.purify import load_prunable

    def load(name: str):
        folder = EXAMPLES / name
        model, neuron_map, output_index = load_prunable(folder / "model.onnx", None)
        clean = load_samples(folder / "clean.npz", input_shape(model))
        classifier = import_model(model, neuron_map, renormalise=True, output_index=output_index)
        x, y = anp.tensors(clean.x, clean.y, torch.device("cpu"))
        anp.calibrate(classifier, x, neuron_mode=AnpSettings().neuron_mode)
        return classifier, x, y

    return load


def batch_with_every_default(folder: Path, root: Path) -> dict[str, object]:
    """`anp-onnx batch` with every default on the example `folder` (model.onnx and its clean, test and
    poison data), with a report folder: {"exit_code", "output", "out_dir", "report_dir"}."""
    from click.testing import CliRunner

    from anp_onnx.cli.main import main

    out_dir, report_dir = root / "out", root / "reports"
    arguments = ["batch", folder / "model.onnx", "--data", folder / "clean.npz", "--test-data", folder / "test.npz"]
    arguments += ["--poison-data", folder / "poison.npz", "--out-dir", out_dir, "--report-dir", report_dir]
    result = CliRunner().invoke(main, [str(argument) for argument in arguments], catch_exceptions=False)
    return {"exit_code": result.exit_code, "output": result.output, "out_dir": out_dir, "report_dir": report_dir}


@pytest.fixture(scope="session")
def backdoored_example_purified_by_default(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The bundled BadNets example (target 0) through `batch_with_every_default`: one run for the tests
    that check what the default does. It takes minutes on two CPU cores: only `make test-slow` uses it."""
    return batch_with_every_default(EXAMPLES / "badnets_resnet_bn", tmp_path_factory.mktemp("default-purify"))


@pytest.fixture(scope="session")
def tiny_backdoor_purified_by_default(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """tests/tiny_backdoor.py's model through `batch_with_every_default` (seconds): the default's
    files, report and pictures, for the suite that `make test` runs."""
    from tiny_backdoor import write_tiny_example

    root = tmp_path_factory.mktemp("tiny-default")
    return batch_with_every_default(write_tiny_example(root / "model"), root)
