"""Fine-Pruning and CLP: plans the rewriter can carry out, rankings that follow their definitions."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import export
from torch import nn

from anp_onnx.data import Samples, load_samples, split_holdout
from anp_onnx.methods import baselines
from anp_onnx.onnx.model import input_shape
from anp_onnx.onnx.neurons import NeuronMap, build_neuron_map
from anp_onnx.onnx.rewrite import apply_plan
from anp_onnx.prune import PruningPlan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
INPUT = (1, 12, 12)


class WideCnn(nn.Module):
    """Two conv-BN-ReLU layers of 16 channels, a hidden Linear of 16, a head: CLP's u=3 needs >= 11 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def wide_cnn() -> WideCnn:
    torch.manual_seed(0)
    model = WideCnn()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.8, 1.2)
            module.bias.data.uniform_(0.1, 0.5)
    return model.eval()


def load(path: Path) -> tuple[onnx.ModelProto, NeuronMap]:
    model = onnx.load(str(path))
    return model, build_neuron_map(model)


def example(name: str) -> tuple[onnx.ModelProto, NeuronMap, Samples]:
    model, neuron_map = load(EXAMPLES / name / "model.onnx")
    return model, neuron_map, load_samples(EXAMPLES / name / "clean.npz", input_shape(model))


def images(count: int = 200, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    return Samples(rng.random((count, *INPUT), dtype=np.float32), rng.integers(0, 3, count))


def layer_tensor(model: onnx.ModelProto, neuron_map: NeuronMap, layer: str, x: np.ndarray) -> np.ndarray:
    """The raw activation of one layer on `x`, read from onnxruntime."""
    node = model.graph.node[neuron_map.layer(layer).output_node_index]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([node.output[0]], {"input": x})[0]


def assert_well_formed(plan: PruningPlan, model: onnx.ModelProto, neuron_map: NeuronMap) -> None:
    keys = [(neuron.layer, neuron.channel) for neuron in plan.neurons]
    assert len(set(keys)) == len(keys)
    for neuron in plan.neurons:
        layer = neuron_map.layer(neuron.layer)
        assert 0 <= neuron.channel < layer.channels
        assert np.isfinite(neuron.mask)
        assert neuron.value == 0.0 or not layer.bias_per_channel


# ----------------------------------------------------------------------------- CLP


@pytest.mark.parametrize("keep_batch_norm", [True, False], ids=["bn", "folded"])
def test_clp_prunes_the_channel_whose_weights_were_blown_up_first(tmp_path: Path, keep_batch_norm: bool) -> None:
    net = wide_cnn()
    with torch.no_grad():
        net.features[3].weight[5] *= 20.0
    model, neuron_map = load(export(net, tmp_path / "m.onnx", keep_batch_norm=keep_batch_norm, input_shape=INPUT))
    plan = baselines.clp(model, neuron_map)
    second_conv = neuron_map.layers[1].name
    assert (plan.neurons[0].layer, plan.neurons[0].channel) == (second_conv, 5)
    assert [neuron.layer for neuron in plan.neurons] == [second_conv]
    assert_well_formed(plan, model, neuron_map)


def test_clp_bound_is_scaled_by_the_batch_norm_gain(tmp_path: Path) -> None:
    net = wide_cnn()
    with torch.no_grad():
        net.features[4].weight[9] = 30.0  # gamma only: the conv weights stay as they were
    model, neuron_map = load(export(net, tmp_path / "m.onnx", keep_batch_norm=True, input_shape=INPUT))
    bounds = baselines.channel_lipschitz(model, neuron_map)[neuron_map.layers[1].name]
    assert int(np.argmax(bounds)) == 9
    weight = net.features[3].weight.detach().double().numpy()[9].reshape(16, -1)
    gain = 30.0 / np.sqrt(net.features[4].running_var[9].item() + 1e-5)
    assert bounds[9] == pytest.approx(np.linalg.norm(weight, ord=2) * gain, rel=1e-5)


def test_clp_is_data_free_so_both_exports_of_one_model_get_the_same_plan() -> None:
    """The bundled bn and folded examples are the same weights: CLP sees only weights, so it decides alike."""
    kept, kept_map = load(EXAMPLES / "badnets_resnet_bn" / "model.onnx")
    folded, folded_map = load(EXAMPLES / "badnets_resnet_folded" / "model.onnx")
    positions = {layer.name: index for index, layer in enumerate(kept_map.layers)}
    positions.update({layer.name: index for index, layer in enumerate(folded_map.layers)})
    kept_plan, folded_plan = baselines.clp(kept, kept_map), baselines.clp(folded, folded_map)
    assert kept_plan.neurons
    assert [(positions[n.layer], n.channel) for n in kept_plan.neurons] == [
        (positions[n.layer], n.channel) for n in folded_plan.neurons
    ]
    kept_bounds = baselines.channel_lipschitz(kept, kept_map)
    folded_bounds = baselines.channel_lipschitz(folded, folded_map)
    for kept_layer, folded_layer in zip(kept_map.layers, folded_map.layers, strict=True):
        np.testing.assert_allclose(kept_bounds[kept_layer.name], folded_bounds[folded_layer.name], rtol=1e-4)


def test_clp_never_prunes_in_layers_too_narrow_for_the_threshold(tmp_path: Path) -> None:
    """One outlier among n channels is at most (n-1)/sqrt(n) sample standard deviations out: under 3 for n <= 10."""
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(800, 3)).eval()
    with torch.no_grad():
        net[0].weight[2] *= 1000.0
    model, neuron_map = load(export(net, tmp_path / "m.onnx", keep_batch_norm=True, input_shape=INPUT))
    assert baselines.clp(model, neuron_map, u=3.0).neurons == ()
    assert [(n.channel) for n in baselines.clp(model, neuron_map, u=2.0).neurons] == [2]


# ----------------------------------------------------------------------------- Fine-Pruning


def test_head_layers_are_the_last_prunable_layers() -> None:
    resnet, resnet_map = load(EXAMPLES / "badnets_resnet_bn" / "model.onnx")
    names = [layer.name for layer in baselines.head_layers(resnet, resnet_map)]
    assert names == [
        "/layers/layers.2/bn2/BatchNormalization",
        "/layers/layers.2/shortcut/shortcut.1/BatchNormalization",
    ]
    vgg, vgg_map = load(EXAMPLES / "blend_vgg_bn" / "model.onnx")
    assert [layer.name for layer in baselines.head_layers(vgg, vgg_map)] == ["/classifier/classifier.0/Gemm"]


@pytest.mark.parametrize("keep_batch_norm", [True, False], ids=["bn", "folded"])
def test_fine_pruning_ranks_a_silent_neuron_first(tmp_path: Path, keep_batch_norm: bool) -> None:
    net = wide_cnn()
    with torch.no_grad():
        net.features[8].bias += 1.0  # every hidden neuron active on these inputs ...
        net.features[8].weight[11] = 0.0  # hidden Linear neuron 11 ... but 11, which always outputs -3
        net.features[8].bias[11] = -3.0
        net.features[4].weight[6] = 0.0  # second BN channel 6 outputs -2: dormant
        net.features[4].bias[6] = -2.0
    model, neuron_map = load(export(net, tmp_path / "m.onnx", keep_batch_norm=keep_batch_norm, input_shape=INPUT))
    hidden, second = neuron_map.layers[2].name, neuron_map.layers[1].name
    head = baselines.fine_pruning_scores(model, neuron_map, images().x, scope="head")
    assert list(head.masks) == [hidden]
    assert (head.ranked()[0].layer, head.ranked()[0].channel) == (hidden, 11)
    assert head.ranked()[0].mask == 0.0 and head.ranked()[1].mask > 0.0
    everywhere = baselines.fine_pruning_scores(model, neuron_map, images().x, scope="all")
    assert {(n.layer, n.channel) for n in everywhere.ranked()[:2]} == {(hidden, 11), (second, 6)}


def test_fine_pruning_keeps_held_out_accuracy_within_the_budget() -> None:
    model, neuron_map, clean = example("badnets_resnet_bn")
    plan = baselines.fine_pruning(model, neuron_map, clean, max_acc_drop=0.02)
    assert plan.neurons
    assert_well_formed(plan, model, neuron_map)
    head = {layer.name for layer in baselines.head_layers(model, neuron_map)}
    assert {neuron.layer for neuron in plan.neurons} <= head
    _, held_out = split_holdout(clean, 0.2, seed=0)
    accuracy_of = baselines.held_out_accuracy(model, neuron_map, held_out)
    assert accuracy_of(PruningPlan("none", ())) - accuracy_of(plan) <= 0.02 + 1e-9
    masks = [neuron.mask for neuron in plan.neurons]
    assert masks == sorted(masks)  # least active first


def export_fixed_batch(net: nn.Module, path: Path, batch: int) -> Path:
    """TorchScript export with BatchNorm kept and the batch dimension fixed: the graph takes `batch` samples only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.rand(batch, *INPUT),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    return path


def test_fine_pruning_runs_a_fixed_batch_graph_on_sample_counts_that_leave_a_short_last_batch(tmp_path: Path) -> None:
    """45 samples: 36 to rank on and 9 held out, neither a multiple of the graph's batch of 8. The short
    last batch is padded, so activations, held-out accuracy and the plan are the dynamic-batch model's."""
    fixed, fixed_map = load(export_fixed_batch(wide_cnn(), tmp_path / "fixed.onnx", batch=8))
    dynamic, dynamic_map = load(export(wide_cnn(), tmp_path / "dynamic.onnx", keep_batch_norm=True, input_shape=INPUT))
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 8
    assert [layer.name for layer in fixed_map.layers] == [layer.name for layer in dynamic_map.layers]
    clean = images(45, seed=4)
    measured = baselines.mean_activations(fixed, list(fixed_map.layers), clean.x[:37])
    expected = baselines.mean_activations(dynamic, list(dynamic_map.layers), clean.x[:37])
    assert list(measured) == list(expected)
    for name, values in measured.items():
        np.testing.assert_allclose(values, expected[name], rtol=1e-5, atol=1e-7)

    kept, held_out = split_holdout(clean, 0.2, seed=0)
    assert (len(kept) % 8, len(held_out) % 8) == (4, 1)
    plan = baselines.fine_pruning(fixed, fixed_map, clean, max_acc_drop=0.5, scope="all")
    dynamic_plan = baselines.fine_pruning(dynamic, dynamic_map, clean, max_acc_drop=0.5, scope="all")
    assert plan.neurons
    assert [(n.layer, n.channel) for n in plan.neurons] == [(n.layer, n.channel) for n in dynamic_plan.neurons]
    half = PruningPlan("half", plan.neurons[: len(plan.neurons) // 2])
    pruned = apply_plan(dynamic, dynamic_map, half).SerializeToString()
    logits = ort.InferenceSession(pruned, providers=["CPUExecutionProvider"]).run(None, {"input": held_out.x})[0]
    accuracy = baselines.held_out_accuracy(fixed, fixed_map, held_out)(half)
    assert accuracy == np.count_nonzero(logits.argmax(1) == held_out.y) / len(held_out)


# ----------------------------------------------------------------------------- through the rewriter


@pytest.mark.parametrize("name", ["badnets_resnet_bn", "badnets_resnet_folded"])
def test_baseline_plans_rewrite_into_valid_models_whose_pruned_neurons_output_zero(name: str) -> None:
    model, neuron_map, clean = example(name)
    for plan in (baselines.clp(model, neuron_map), baselines.fine_pruning(model, neuron_map, clean)):
        assert plan.neurons
        pruned = apply_plan(model, neuron_map, plan)
        onnx.checker.check_model(pruned, full_check=True)
        for neuron in plan.neurons[:3]:
            activation = layer_tensor(pruned, neuron_map, neuron.layer, clean.x[:64])
            assert np.all(np.take(activation, neuron.channel, axis=1) == 0.0)
        session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": clean.x[:32]})[0]
        assert logits.shape == (32, 10) and np.isfinite(logits).all()
