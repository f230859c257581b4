"""What vendors ship, exported from torch: opsets 9 to 21, kept and folded BatchNorm (also after a Gemm),
static and dynamic batch, channels-last inputs, preprocessing inside the graph, probability outputs,
several outputs, float16 and external data. Each passes issue 4's round trip (coverage_check.round_trip)."""

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
from coverage_check import ort_outputs, round_trip
from onnx import numpy_helper
from torch import nn

from anp_onnx.bridge.importer import FALLBACK_OPSET, hard_masks, import_model, output_kind
from anp_onnx.bridge.normalise import normalised_for_torch
from anp_onnx.cli.main import main
from anp_onnx.methods import anp
from anp_onnx.methods.anp import AnpSettings
from anp_onnx.methods.settings import AnpMethodSettings, PruningChoice
from anp_onnx.onnx.neurons import build_neuron_map
from anp_onnx.pipeline.purify import purify
from anp_onnx.prune import PruningPlan

SHORT = AnpSettings(iterations=3, batch_size=16)


def short_anp(pruning: PruningChoice) -> dict[str, object]:
    """purify's method and settings: a few ANP iterations, then `pruning`."""
    return {"method": "anp", "settings": AnpMethodSettings(optimisation=SHORT, pruning=pruning)}


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


def export(
    model: nn.Module,
    path: Path,
    opset: int = 17,
    outputs=("logits",),
    keep_batch_norm=True,
    static_batch: int | None = None,
    input_shape: tuple[int, ...] = INPUT_SHAPE,
) -> Path:
    """TorchScript export at `opset`, batch dimension dynamic unless `static_batch` fixes it."""
    training = torch.onnx.TrainingMode.PRESERVE if keep_batch_norm else torch.onnx.TrainingMode.EVAL
    axes = None if static_batch else {name: {0: "batch"} for name in ("input", *outputs)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.rand(static_batch or 2, *input_shape),),
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
    """The class output, head included (what onnxruntime computes)."""
    classifier.eval()
    with torch.no_grad():
        return classifier.class_output(torch.from_numpy(x)).numpy()


# Probabilities


def test_a_softmax_output_is_read_as_probabilities_and_the_loss_is_cross_entropy_of_the_logits(tmp_path, image_samples):
    path = export(WithSoftmax(), tmp_path / "softmax.onnx")
    model = onnx.load(str(path))
    data = np.load(image_samples)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    classifier = import_model(model, build_neuron_map(model), renormalise=True)
    assert output_kind(model) == "probabilities"
    classifier.eval()
    with torch.no_grad():
        loss = classifier.loss(classifier(x), y)
        expected = nn.functional.cross_entropy(small_cnn()(x), y)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_purifying_a_softmax_model_writes_what_torch_computes_with_the_same_hard_masks(tmp_path, image_samples):
    path = export(WithSoftmax(), tmp_path / "softmax.onnx")
    pruning = PruningChoice(threshold=None, fraction=0.3)
    result = purify(path, image_samples, tmp_path / "out.onnx", **short_anp(pruning), device="cpu")
    assert result.plan.neurons, "a third of the neurons is pruned"

    model = onnx.load(str(path))
    x = np.load(image_samples)["x"]
    neuron_map = build_neuron_map(model)
    classifier = import_model(model, neuron_map, renormalise=True)
    anp.calibrate(classifier, torch.from_numpy(x))
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
    args = [
        "purify",
        str(two_heads),
        "--data",
        str(image_samples),
        "-o",
        str(output),
        "--method",
        "anp",
        "--iterations",
        "2",
    ]
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
    result = purify(path, image_samples, tmp_path / "out.onnx", **short_anp(pruning), device="cpu")
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


# The round trip for every exported variant


@pytest.fixture(scope="module")
def few_images(image_samples) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(image_samples)
    return data["x"][:16], data["y"][:16]


@pytest.mark.parametrize("keep_batch_norm", [True, False], ids=["batchnorm", "folded"])
@pytest.mark.parametrize("opset", range(9, 22))
def test_opsets_9_to_21_round_trip(tmp_path, few_images, opset, keep_batch_norm):
    """The TorchScript exporter writes up to opset 20; 21 comes from onnx's version converter."""
    path = export(small_cnn(), tmp_path / "model.onnx", opset=min(opset, 20), keep_batch_norm=keep_batch_norm)
    if opset == 21:
        onnx.save(onnx.version_converter.convert_version(onnx.load(str(path)), 21), str(path))
    assert onnx.load(str(path)).opset_import[0].version == opset
    checked = round_trip(path, *few_images)
    kinds = {layer.op_type for layer in checked.neuron_map.layers}
    assert ("BatchNormalization" in kinds) == keep_batch_norm


class Viewed(nn.Module):
    """small_cnn with `x.view(x.size(0), -1)` before the Linear layers: a static export bakes the batch
    size into a Reshape target."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.net.features[:8](x)
        return self.net.features[9:](hidden.view(hidden.size(0), -1))


@pytest.mark.parametrize("batch", [1, 2])
def test_a_static_batch_model_is_optimised_on_larger_batches_and_round_trips(tmp_path, few_images, batch):
    path = export(Viewed(), tmp_path / "static.onnx", static_batch=batch)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch
    assert "Reshape" in [node.op_type for node in model.graph.node]
    round_trip(path, *few_images, settings=AnpSettings(iterations=2, batch_size=8))


def test_purify_runs_a_static_batch_model_end_to_end(tmp_path, image_samples):
    path = export(Viewed(), tmp_path / "static.onnx", static_batch=2)
    pruning = PruningChoice(threshold=None, count=4)
    result = purify(path, image_samples, tmp_path / "out.onnx", test_data=image_samples, **short_anp(pruning))
    assert len(result.plan.neurons) == 4 and result.after.acc is not None


class ChannelsLast(nn.Module):
    """Takes NHWC images and transposes them, as TensorFlow converters write it; 3 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()
        self.net.features[0] = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


class Preprocessing(nn.Module):
    """Mean subtraction and division by the standard deviation inside the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()
        self.register_buffer("mean", torch.tensor([0.45]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([0.25]).view(1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def test_an_nhwc_input_behind_a_transpose_round_trips(tmp_path):
    path = export(ChannelsLast(), tmp_path / "nhwc.onnx", input_shape=(16, 16, 3))
    x = np.random.default_rng(0).random((16, 16, 16, 3), dtype=np.float32)
    round_trip(path, x, np.arange(16) % 4)


def test_purify_feeds_uint8_images_to_an_nhwc_model_as_they_are(tmp_path):
    path = export(ChannelsLast(), tmp_path / "nhwc.onnx", input_shape=(16, 16, 3))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    data = tmp_path / "images.npz"
    np.savez(data, x=images, y=rng.integers(0, 4, 32))
    result = purify(path, data, tmp_path / "out.onnx", **short_anp(PruningChoice(threshold=None, count=3)))
    assert len(result.plan.neurons) == 3


def test_preprocessing_inside_the_graph_round_trips_and_inspect_shows_it(tmp_path, few_images):
    path = export(Preprocessing(), tmp_path / "pre.onnx")
    round_trip(path, *few_images)
    steps = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)["preprocessing"]
    assert steps == ["Sub: x - [0.45]", "Div: x / [0.25]"]


class WithActivation(nn.Module):
    def __init__(self, activation) -> None:
        super().__init__()
        self.logits = small_cnn()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.logits(x))


ACTIVATIONS = {
    "probabilities": lambda z: torch.softmax(z, dim=1),
    "log_probabilities": lambda z: torch.log_softmax(z, dim=1),
    "sigmoid": torch.sigmoid,
}


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
def test_probability_outputs_round_trip_and_their_loss_is_the_training_loss(tmp_path, few_images, kind):
    path = export(WithActivation(ACTIVATIONS[kind]), tmp_path / f"{kind}.onnx")
    checked = round_trip(path, *few_images)
    assert checked.classifier.output_kind == kind
    x, y = torch.from_numpy(few_images[0]), torch.from_numpy(few_images[1])
    model = onnx.load(str(path))
    classifier = import_model(model, build_neuron_map(model), renormalise=True).eval()
    with torch.no_grad():
        logits = small_cnn()(x)
        assert torch.allclose(classifier(x), logits, atol=1e-5), "forward returns the head's input"
        loss = classifier.loss(classifier(x), y)
    if kind == "sigmoid":
        targets = nn.functional.one_hot(y, 4).float()
        expected = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(y)
    else:
        expected = nn.functional.cross_entropy(logits, y)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_a_softmax_behind_a_reshape_is_still_read_as_probabilities(tmp_path):
    class Flattened(WithActivation):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).reshape(len(x), -1)

    path = export(Flattened(ACTIVATIONS["probabilities"]), tmp_path / "flat.onnx")
    assert output_kind(onnx.load(str(path))) == "probabilities"


def test_the_chosen_class_output_of_a_two_output_model_round_trips(two_heads, few_images):
    checked = round_trip(two_heads, *few_images, class_output="logits")
    assert checked.classifier.output_index == 1


class BatchNormAfterLinear(nn.Module):
    """Linear -> BatchNorm1d -> ReLU, twice, and a Linear head: the MLP with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(
            nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12, bias=False), nn.BatchNorm1d(12),
            nn.ReLU(), nn.Linear(12, 5),
        )  # fmt: skip
        for module in self.layers:
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_batch_norm_after_gemm_carries_the_neurons_and_round_trips(tmp_path, vector_samples):
    path = export(BatchNormAfterLinear(), tmp_path / "mlp_bn.onnx", input_shape=(20,))
    data = np.load(vector_samples)
    checked = round_trip(path, data["x"][:16], data["y"][:16])
    assert [(layer.op_type, layer.channels) for layer in checked.neuron_map.layers] == [
        ("BatchNormalization", 16),
        ("BatchNormalization", 12),
    ]


# float16 and external data


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The whole graph in float16, as onnxconverter-common's float16 conversion writes it."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    for tensor in result.graph.initializer:
        if tensor.data_type == float32:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for node in result.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == float32:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float16)))
    for value in [*result.graph.input, *result.graph.output]:
        if value.type.tensor_type.elem_type == float32:
            value.type.tensor_type.elem_type = float16
    del result.graph.value_info[:]
    onnx.checker.check_model(result, full_check=True)
    return result


@pytest.mark.parametrize("keep_batch_norm", [True, False], ids=["batchnorm", "folded"])
def test_a_float16_model_round_trips_optimised_in_float32_and_stays_float16(tmp_path, few_images, keep_batch_norm):
    exported = export(small_cnn(), tmp_path / "model.onnx", keep_batch_norm=keep_batch_norm)
    path = tmp_path / "half.onnx"
    onnx.save(to_float16(onnx.load(str(exported))), str(path))
    checked = round_trip(path, *few_images)
    assert checked.classifier.tolerance == 1e-2
    float16 = onnx.TensorProto.FLOAT16
    assert {tensor.data_type for tensor in checked.rewritten.graph.initializer} == {float16}
    assert checked.rewritten.graph.input[0].type.tensor_type.elem_type == float16


def test_a_pruned_float16_channel_outputs_the_value_torch_used(tmp_path, few_images):
    """The pruned constant is rounded to float16 in torch too, so (b) holds at 1e-4 in float32."""
    exported = export(small_cnn(), tmp_path / "model.onnx", keep_batch_norm=False)
    path = tmp_path / "half.onnx"
    onnx.save(to_float16(onnx.load(str(exported))), str(path))
    checked = round_trip(path, *few_images)
    gate = checked.classifier.gates[0]
    assert gate.stored_dtype == torch.float16
    value = gate.pruned_value[0].item()
    assert value != float(np.float16(value)), "the clean mean is not a float16 number: rounding matters"


def test_a_model_with_external_data_round_trips_and_purifies(tmp_path, few_images, image_samples):
    folder = tmp_path / "vendor"
    folder.mkdir()
    model = onnx.load(str(export(small_cnn(), tmp_path / "model.onnx")))
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    stored = onnx.load(str(path), load_external_data=False).graph.initializer
    assert all(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in stored)
    round_trip(path, *few_images)
    pruning = PruningChoice(threshold=None, count=5)
    result = purify(path, image_samples, tmp_path / "out.onnx", **short_anp(pruning))
    x = few_images[0]
    assert not np.array_equal(ort_outputs(result.output, x), ort_outputs(path, x))
    assert sorted(path.parent.iterdir()) == [folder / "model.onnx", folder / "model.onnx.data"], "input untouched"


def test_inspect_reports_producer_opset_shapes_layers_and_preprocessing(tmp_path):
    path = export(ChannelsLast(), tmp_path / "nhwc.onnx", input_shape=(16, 16, 3), opset=13)
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    described = json.loads(result.output)
    assert described["producer"] == f"pytorch {torch.__version__.split('+')[0]}"
    assert described["opset"] == {"ai.onnx": 13}
    assert described["inputs"] == [{"name": "input", "shape": ["batch", 16, 16, 3], "type": "float"}]
    assert described["outputs"] == [{"name": "logits", "shape": ["batch", 4], "type": "float"}]
    assert [(layer["op_type"], layer["neurons"]) for layer in described["layers"]] == [
        ("BatchNormalization", 6),
        ("BatchNormalization", 8),
        ("Gemm", 12),
    ]
    assert described["preprocessing"] == ["Transpose NHWC -> NCHW (the model takes channels-last images)"]
    assert described["unsupported"] == []
    text = CliRunner().invoke(main, ["inspect", str(path)]).output
    assert "input     input  float[batchx16x16x3]" in text and "Transpose NHWC -> NCHW" in text


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_dynamo_exports_with_static_and_dynamic_batch_round_trip(tmp_path, few_images, dynamic):
    path = tmp_path / "dynamo.onnx"
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Viewed().eval(), (torch.rand(2, *INPUT_SHAPE),), str(path), dynamo=True, dynamic_shapes=shapes
        )
    batch = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.HasField("dim_param") == dynamic
    round_trip(path, *few_images)


def test_purify_and_evaluate_run_a_float16_model_fed_float32_data(tmp_path, image_samples):
    exported = export(small_cnn(), tmp_path / "model.onnx", keep_batch_norm=False)
    path = tmp_path / "half.onnx"
    onnx.save(to_float16(onnx.load(str(exported))), str(path))
    pruning = PruningChoice(threshold=None, count=6)
    output = tmp_path / "out.onnx"
    result = purify(path, image_samples, output, test_data=image_samples, **short_anp(pruning))
    assert len(result.plan.neurons) == 6 and result.after.acc is not None
    written = onnx.load(str(output))
    assert written.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    evaluated = json.loads(
        CliRunner().invoke(main, ["evaluate", str(output), "--data", str(image_samples), "--json"]).output
    )
    assert evaluated["acc"] == result.after.acc
