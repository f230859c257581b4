"""What vendors ship: probability outputs, several outputs, and opsets other than 17."""

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx2torch
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import INPUT_SHAPE, small_cnn
from torch import nn

from anp_onnx import anp
from anp_onnx.anp import AnpSettings
from anp_onnx.cli import main
from anp_onnx.importer import FALLBACK_OPSET, import_model, outputs_probabilities
from anp_onnx.model import normalised_for_torch
from anp_onnx.neurons import build_neuron_map
from anp_onnx.prune import PruningPlan
from anp_onnx.purify import PruningChoice, hard_masks, purify

SHORT = AnpSettings(iterations=3, batch_size=16)


class WithSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.logits = small_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


class TwoHeads(nn.Module):
    """An auxiliary 3-class head listed first, the 4-class logits second."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = small_cnn().features[:-1]
        self.aux = nn.Linear(12, 3)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x)
        return self.aux(hidden), self.head(hidden)


def export(model: nn.Module, path: Path, opset: int = 17, outputs=("logits",), keep_batch_norm=True) -> Path:
    """TorchScript export at `opset`, batch dimension dynamic."""
    training = torch.onnx.TrainingMode.PRESERVE if keep_batch_norm else torch.onnx.TrainingMode.EVAL
    axes = {name: {0: "batch"} for name in ("input", *outputs)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.rand(2, *INPUT_SHAPE),),
            str(path),
            input_names=["input"],
            output_names=list(outputs),
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            training=training,
        )
    return path


def run(path: Path, x: np.ndarray, output: str | None = None) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([output] if output else None, {"input": x})[0]


def torch_outputs(classifier, x: np.ndarray) -> np.ndarray:
    classifier.eval()
    with torch.no_grad():
        return classifier(torch.from_numpy(x)).numpy()


# Probabilities


def test_a_softmax_output_is_read_as_probabilities_and_the_loss_is_cross_entropy_of_the_logits(tmp_path, image_samples):
    path = export(WithSoftmax(), tmp_path / "softmax.onnx")
    model = onnx.load(str(path))
    data = np.load(image_samples)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    classifier = import_model(model, build_neuron_map(model), renormalise=True)
    assert outputs_probabilities(model)
    classifier.eval()
    with torch.no_grad():
        loss = classifier.loss(classifier(x), y)
        expected = nn.functional.cross_entropy(small_cnn()(x), y)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_purifying_a_softmax_model_writes_what_torch_computes_with_the_same_hard_masks(tmp_path, image_samples):
    path = export(WithSoftmax(), tmp_path / "softmax.onnx")
    pruning = PruningChoice(threshold=None, fraction=0.3)
    result = purify(path, image_samples, tmp_path / "out.onnx", settings=SHORT, pruning=pruning, device="cpu")
    assert result.plan.neurons, "a third of the neurons is pruned"

    model = onnx.load(str(path))
    x = np.load(image_samples)["x"]
    neuron_map = build_neuron_map(model)
    classifier = import_model(model, neuron_map, renormalise=True)
    anp.calibrate(classifier, torch.from_numpy(x), SHORT)
    hard_masks(classifier, result.plan)
    actual = run(result.output, x)
    assert np.max(np.abs(actual - torch_outputs(classifier, x))) <= 1e-5
    assert np.allclose(actual.sum(axis=1), 1.0, atol=1e-5), "still probabilities"


# Several outputs


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory) -> Path:
    return export(TwoHeads(), tmp_path_factory.mktemp("two") / "two.onnx", outputs=("aux", "logits"))


def test_the_class_output_is_chosen_by_position_in_torch(two_heads, image_samples):
    model = onnx.load(str(two_heads))
    x = np.load(image_samples)["x"]
    neuron_map = build_neuron_map(model)
    for index, name in enumerate(("aux", "logits")):
        classifier = import_model(model, neuron_map, renormalise=True, output_index=index)
        assert np.allclose(torch_outputs(classifier, x), run(two_heads, x, name), atol=1e-5), name


def test_purify_and_evaluate_use_the_named_class_output(two_heads, image_samples, tmp_path):
    runner = CliRunner()
    output = tmp_path / "out.onnx"
    args = ["purify", str(two_heads), "--data", str(image_samples), "-o", str(output), "--iterations", "2"]
    refused = runner.invoke(main, args)
    assert refused.exit_code == 2 and "labels must lie in 0..2" in refused.output, "the first output has 3 classes"
    purified = runner.invoke(main, [*args, "--class-output", "logits", "--prune-count", "5", "--batch-size", "16"])
    assert purified.exit_code == 0, purified.output

    data = np.load(image_samples)
    expected = float(np.mean(run(output, data["x"], "logits").argmax(1) == data["y"]))
    evaluate = ["evaluate", str(output), "--data", str(image_samples), "--json"]
    named = json.loads(runner.invoke(main, [*evaluate, "--class-output", "logits"]).output)
    first = json.loads(runner.invoke(main, evaluate).output)
    assert named["acc"] == expected
    assert first["acc"] == float(np.mean(run(output, data["x"], "aux").argmax(1) == data["y"]))


@pytest.mark.parametrize("command", ["purify", "evaluate", "scan"])
def test_an_unknown_class_output_is_refused_listing_the_outputs(two_heads, image_samples, tmp_path, command):
    args = [command, str(two_heads), "--data", str(image_samples), "--class-output", "probs"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "no output named 'probs': the model's outputs are aux, logits" in result.output
    assert not list(tmp_path.iterdir())


# Opsets


@pytest.mark.parametrize("keep_batch_norm", [True, False], ids=["batchnorm", "folded"])
@pytest.mark.parametrize("opset", [9, 13, 18, 20])
def test_other_opsets_import_purify_and_reproduce_the_model_when_nothing_is_pruned(
    tmp_path, image_samples, opset, keep_batch_norm
):
    path = export(small_cnn(), tmp_path / "model.onnx", opset=opset, keep_batch_norm=keep_batch_norm)
    assert onnx.load(str(path)).opset_import[0].version == opset
    pruning = PruningChoice(threshold=None, count=0)
    result = purify(path, image_samples, tmp_path / "out.onnx", settings=SHORT, pruning=pruning, device="cpu")
    x = np.load(image_samples)["x"]
    assert result.plan.neurons == ()
    assert np.array_equal(run(result.output, x), run(path, x))
    assert result.output.read_bytes() == path.read_bytes()


def test_opset_20_goes_through_the_version_converter_and_keeps_the_node_names(tmp_path, image_samples):
    path = export(small_cnn(), tmp_path / "model.onnx", opset=20)
    model = onnx.load(str(path))
    with pytest.raises(NotImplementedError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx2torch.convert(normalised_for_torch(model))
    converted = onnx.version_converter.convert_version(normalised_for_torch(model), FALLBACK_OPSET)
    assert [node.name for node in converted.graph.node] == [
        node.name for node in normalised_for_torch(model).graph.node
    ]

    neuron_map = build_neuron_map(model)
    classifier = import_model(model, neuron_map, renormalise=True)
    x = np.load(image_samples)["x"]
    assert np.max(np.abs(torch_outputs(classifier, x) - run(path, x))) <= 1e-5
    hard_masks(classifier, PruningPlan("none", ()))
    assert len(classifier.gates) == len(neuron_map.layers) == 3
