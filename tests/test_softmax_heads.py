"""Models that end in Softmax (Keras, tf2onnx, PaddlePaddle) are optimised on their logits (issue 24): the
torch model returns the head's input, every objective sees logits, and scan and purify name the same
target as on the model without the head. A synthesised trigger that never reaches its label is a failed
synthesis, not a low synthetic ASR."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import INPUT_SHAPE, export
from coverage_check import ort_outputs
from onnx import helper
from tiny_backdoor import TARGET, class_images, stamp, train_tiny
from torch import nn

from anp_onnx.bridge.importer import check_equivalence, import_model, output_kind
from anp_onnx.methods.perturbation import calibrate
from anp_onnx.methods.settings import TriggerMethodSettings
from anp_onnx.methods.trigger.guided import GuidedSettings
from anp_onnx.methods.trigger.pruning import prune_against_trigger
from anp_onnx.methods.trigger.synthesis import Trigger, TriggerSettings, synthesise_trigger
from anp_onnx.onnx.neurons import build_neuron_map
from anp_onnx.pipeline.purify import purify
from anp_onnx.pipeline.scan import scan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUICK_STAGES = GuidedSettings().scaled(0.15)  # 15 steps per label, a 60-step patch: seconds on this model


def with_handmade_head(logits_path: Path, path: Path, op: str = "Softmax") -> Path:
    """The logits model with `op`, Flatten and Identity appended with onnx.helper, as exporters write heads."""
    model = onnx.load(str(logits_path))
    logits = model.graph.output[0].name
    model.graph.node.extend(
        [
            helper.make_node(op, [logits], ["scores"], axis=1),
            helper.make_node("Flatten", ["scores"], ["flat"], axis=1),
            helper.make_node("Identity", ["flat"], ["probabilities"]),
        ]
    )
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", 4]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict[str, Path]:
    """One backdoored model, four ways: logits, softmax in torch's forward, and hand-made ONNX heads."""
    folder = tmp_path_factory.mktemp("heads")
    net = train_tiny()
    logits = export(net, folder / "logits.onnx", keep_batch_norm=True)
    return {
        "logits": logits,
        "torch softmax": export(nn.Sequential(net, nn.Softmax(dim=1)), folder / "softmax.onnx", keep_batch_norm=True),
        "onnx softmax": with_handmade_head(logits, folder / "head.onnx"),
        "onnx log-softmax": with_handmade_head(logits, folder / "log_head.onnx", "LogSoftmax"),
    }


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    x, y = class_images(256, seed=3)
    path = tmp_path_factory.mktemp("clean") / "clean.npz"
    np.savez(path, x=x, y=y)
    return path


def imported(path: Path):
    model = onnx.load(str(path))
    return import_model(model, build_neuron_map(model), renormalise=True).eval()


def test_the_tiny_model_carries_the_backdoor(heads):
    x, y = class_images(512, seed=4)
    logits = ort_outputs(heads["logits"], x)
    assert (logits.argmax(1) == y).mean() > 0.9
    assert (ort_outputs(heads["logits"], stamp(x[y != TARGET])).argmax(1) == TARGET).mean() > 0.9


def test_forward_returns_the_logits_whatever_the_head_and_class_output_what_the_graph_outputs(heads):
    x = class_images(64, seed=5)[0]
    inputs = torch.from_numpy(x)
    with torch.no_grad():
        logits = imported(heads["logits"])(inputs)
    kinds = {"logits": "logits", "torch softmax": "probabilities", "onnx softmax": "probabilities"}
    kinds["onnx log-softmax"] = "log_probabilities"
    for name, path in heads.items():
        classifier = imported(path)
        assert classifier.output_kind == output_kind(onnx.load(str(path))) == kinds[name], name
        with torch.no_grad():
            assert torch.allclose(classifier(inputs), logits, atol=1e-5), name
            graph_output = classifier.class_output(inputs).numpy()
        assert np.allclose(graph_output, ort_outputs(path, x), atol=1e-5), name
        check_equivalence(classifier, x, ort_outputs(path, x), name)
    with torch.no_grad():
        probabilities = imported(heads["onnx softmax"]).class_output(inputs)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(x)), atol=1e-5), "the head is applied"


def test_a_trigger_synthesised_through_a_softmax_head_is_the_one_synthesised_on_the_logits(heads):
    x, y = (torch.from_numpy(array) for array in class_images(256, seed=6))
    settings = TriggerSettings(steps=80, bfloat16=False)
    triggers = {}
    for name in ("logits", "onnx softmax"):
        classifier = imported(heads[name])
        calibrate(classifier, x)
        triggers[name] = synthesise_trigger(classifier, x, y, TARGET, settings)
    assert triggers["onnx softmax"].success == triggers["logits"].success > 0.9
    assert triggers["onnx softmax"].size == pytest.approx(triggers["logits"].size, rel=1e-3)


def test_scan_sees_the_same_logits_whatever_the_head(heads, clean_data):
    """The tiny model is reached by a small patch for every label (its backdoor is not the smallest), so
    what is checked here is that the head changes nothing: the same label, sizes and successes."""
    results = {name: scan(path, clean_data, rounds=1, trigger_steps=40) for name, path in heads.items()}
    reference = results["logits"]
    for name, result in results.items():
        assert result.suspected_target == reference.suspected_target, name
        assert result.trigger_sizes == pytest.approx(reference.trigger_sizes, rel=1e-3), name
        assert min(result.trigger_successes) > 0.5, f"{name}: every label's trigger reaches its label"


@pytest.mark.slow  # three minutes on two CPU cores; the tiny model's tests above check the heads in seconds
def test_scan_names_the_true_target_of_the_bundled_badnets_model_behind_a_handmade_softmax(tmp_path):
    """The bundled BadNets ResNet (target 0) with Softmax, Flatten and Identity appended: the target is
    named as on the logits, with the same trigger sizes (seconds with 30 steps per label)."""
    logits = EXAMPLES / "badnets_resnet_bn" / "model.onnx"
    headed = with_handmade_head(logits, tmp_path / "softmax.onnx")
    clean = EXAMPLES / "badnets_resnet_bn" / "clean.npz"
    reference, result = (scan(path, clean, rounds=1, trigger_steps=30) for path in (logits, headed))
    assert result.suspected_target == reference.suspected_target == 0
    assert result.trigger_sizes == pytest.approx(reference.trigger_sizes, rel=1e-3)
    assert result.trigger_sizes[0] == min(result.trigger_sizes) and result.suspicious


@pytest.mark.parametrize("name", ["torch softmax", "onnx softmax"])
def test_purify_names_the_same_target_and_prunes_the_same_neurons_whatever_the_head(heads, clean_data, tmp_path, name):
    settings = TriggerMethodSettings(stages=QUICK_STAGES)
    reference = purify(heads["logits"], clean_data, tmp_path / "logits.onnx", method="trigger", settings=settings)
    result = purify(heads[name], clean_data, tmp_path / "head.onnx", method="trigger", settings=settings)
    assert result.guided["suspected_target"] == reference.guided["suspected_target"]
    assert not result.guided["synthesis_failed"] and result.guided["synthetic_asr_before"] > 0.9
    assert result.guided["synthetic_asr_before"] == pytest.approx(reference.guided["synthetic_asr_before"], abs=0.01)
    assert [(neuron.layer, neuron.channel) for neuron in result.plan.neurons] == [
        (neuron.layer, neuron.channel) for neuron in reference.plan.neurons
    ]


@pytest.mark.slow  # about a minute on two CPU cores
def test_purify_removes_the_bundled_backdoor_behind_a_handmade_softmax(tmp_path):
    folder = EXAMPLES / "badnets_resnet_bn"
    headed = with_handmade_head(folder / "model.onnx", tmp_path / "softmax.onnx")
    settings = TriggerMethodSettings(stages=GuidedSettings().scaled(0.3))
    result = purify(
        headed,
        folder / "clean.npz",
        tmp_path / "out.onnx",
        method="trigger",
        settings=settings,
        test_data=folder / "test.npz",
        poison_data=folder / "poison.npz",
    )
    assert result.guided["suspected_target"] == 0 and not result.guided["synthesis_failed"]
    assert result.plan.neurons and result.before.asr > 0.9 and result.after.asr < 0.1
    assert result.after.acc > result.before.acc - 0.05


def test_a_trigger_that_never_reaches_its_label_is_reported_as_a_failed_synthesis(heads):
    x, y = (torch.from_numpy(array) for array in class_images(256, seed=7))
    classifier = imported(heads["onnx softmax"])
    calibrate(classifier, x)
    nothing = torch.zeros((1, *INPUT_SHAPE))  # a mask of 0 stamps nothing: clean inputs keep their labels
    trigger = Trigger("patch", TARGET, nothing, nothing, success=0.0, size=0.0)
    result = prune_against_trigger(classifier, x, y, trigger)
    assert result.synthesis_failed and not result.plan.neurons
    assert result.stopped_because.startswith("trigger synthesis failed")
    summary = result.summary()
    assert summary["synthesis_failed"] is True and "<= 0.03" not in summary["stopped_because"]


def test_onnx2torchs_slice_deprecation_warning_is_not_printed(tmp_path):
    """onnx2torch's Slice indexes with a list, which torch warns about at the first call (importer.py)."""
    script = textwrap.dedent(
        """
        import numpy as np, onnx, torch
        from onnx import TensorProto, helper, numpy_helper
        from anp_onnx.bridge.importer import convert_to_torch
        constant = lambda name, value: numpy_helper.from_array(np.array(value), name)
        nodes = [
            helper.make_node("Shape", ["input"], ["shape"]),
            helper.make_node("Slice", ["shape", "start", "end"], ["batch"]),
            helper.make_node("Concat", ["batch", "rest"], ["flat_shape"], axis=0),
            helper.make_node("Reshape", ["input", "flat_shape"], ["logits"]),
        ]
        constants = [constant("start", [0]), constant("end", [1]), constant("rest", [-1])]
        graph = helper.make_graph(
            nodes,
            "sliced",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 2])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
            constants,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
        print(tuple(convert_to_torch(model)(torch.zeros(3, 2, 2)).shape))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == "(3, 4)"
    assert "non-tuple sequence" not in run.stderr, run.stderr
