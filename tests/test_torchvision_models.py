"""torchvision classifiers with random weights, exported by the TorchScript exporter (batch dynamic) and by
the dynamo exporter (its default: batch fixed at 2), import, pass issue 4's round trip and purify.

Exports are cached per module; resnet18 and mobilenet_v3_small run in the default suite, the others
are marked slow (`make test-slow`). Inputs are 32x32 (vgg11_bn's TorchScript export needs 224: that
exporter cannot write adaptive pooling from 1x1 to 7x7)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from coverage_check import round_trip
from torch import nn

from anp_onnx.methods.anp import AnpSettings
from anp_onnx.methods.settings import AnpMethodSettings
from anp_onnx.pipeline.purify import PruningChoice, purify

FAST = ("resnet18", "mobilenet_v3_small")
SLOW = ("efficientnet_b0", "vgg11_bn", "densenet121")
EXPORTERS = ("torchscript", "dynamo")
CLASSES = 10
SIZE = 32
TORCHSCRIPT_SIZES = {"vgg11_bn": 224}
SAMPLES = 8
SETTINGS = AnpSettings(iterations=2, batch_size=4)


@dataclass(frozen=True)
class Exported:
    name: str
    exporter: str
    path: Path
    size: int


def randomised(model: nn.Module, size: int) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics measured on random images, so that the
    outputs depend on the input (freshly initialised mobilenet/efficientnet output near-constants)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.data = torch.rand(module.weight.shape, generator=generator) + 0.5
            module.bias.data = torch.rand(module.bias.shape, generator=generator) - 0.5
            module.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, size, size, generator=generator))
    return model.eval()


def export(name: str, exporter: str, folder: Path) -> Exported:
    size = TORCHSCRIPT_SIZES.get(name, SIZE) if exporter == "torchscript" else SIZE
    torch.manual_seed(0)
    model = randomised(getattr(torchvision.models, name)(num_classes=CLASSES), size)
    path = folder / f"{name}-{exporter}.onnx"
    arguments = {"input_names": ["input"], "output_names": ["logits"]}
    if exporter == "torchscript":
        arguments.update(dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 3, size, size),), str(path), dynamo=exporter == "dynamo", **arguments)
    return Exported(name, exporter, path, size)


def cases() -> list:
    return [
        pytest.param((name, exporter), id=f"{name}-{exporter}", marks=[pytest.mark.slow] if name in SLOW else [])
        for name in (*FAST, *SLOW)
        for exporter in EXPORTERS
    ]


@pytest.fixture(scope="module", params=cases())
def exported(request, tmp_path_factory) -> Exported:
    name, exporter = request.param
    return export(name, exporter, tmp_path_factory.mktemp(f"{name}-{exporter}"))


def samples(size: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(0)
    return generator.random((SAMPLES, 3, size, size), dtype=np.float32), generator.integers(0, CLASSES, SAMPLES)


def test_imports_and_round_trips(exported):
    checked = round_trip(exported.path, *samples(exported.size), settings=SETTINGS)
    assert checked.neuron_map.total_neurons > 1000
    assert [reason for _, reason in checked.neuron_map.skipped] == ["classifier head: its outputs are the classes"]


def test_purifies(exported, tmp_path):
    x, y = samples(exported.size)
    data = tmp_path / "clean.npz"
    np.savez(data, x=x, y=y)
    pruning = PruningChoice(threshold=None, fraction=0.05)
    settings = AnpMethodSettings(SETTINGS, pruning)
    result = purify(exported.path, data, tmp_path / "out.onnx", test_data=data, method="anp", settings=settings)
    assert len(result.plan.neurons) == round(0.05 * result.neuron_map.total_neurons)
    assert result.output.is_file() and result.after.acc is not None
