import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from anp_onnx.data import Samples, open_samples
from anp_onnx.errors import AnpError
from anp_onnx.validate.evaluate import Evaluator, providers_for


def numpy_forward(model_path, x):
    """The MatMul MLP computed by hand: an independent check on onnxruntime's predictions."""
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model_path)).graph.initializer}
    hidden = np.maximum(x @ weights["w1"] + weights["b1"], 0)
    hidden = np.maximum(hidden @ weights["w2"], 0)
    return hidden @ weights["w3"] + weights["b3"]


def test_acc_and_asr_match_an_independent_count(models):
    rng = np.random.default_rng(1)
    x = rng.random((300, 20), dtype=np.float32)
    predicted = numpy_forward(models["matmul"], x).argmax(1)
    labels = np.where(rng.random(300) < 0.6, predicted, (predicted + 1) % 5)
    target = np.full(300, 3)
    metrics = Evaluator(models["matmul"], "cpu").measure(Samples(x, labels), Samples(x, target))
    assert metrics.acc == np.count_nonzero(predicted == labels) / 300
    assert metrics.asr == np.count_nonzero(predicted == 3) / 300
    assert (metrics.clean_samples, metrics.poison_samples) == (300, 300)


def test_a_streamed_file_is_counted_exactly_as_the_samples_in_memory(models, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.random((2600, 20), dtype=np.float32)
    labels = rng.integers(0, 5, 2600)
    np.savez(tmp_path / "test.npz", x=x, y=labels)
    evaluator = Evaluator(models["matmul"], "cpu")
    streamed = evaluator.accuracy(open_samples(tmp_path / "test.npz", (None, 20)))
    assert streamed == np.count_nonzero(numpy_forward(models["matmul"], x).argmax(1) == labels) / 2600


def test_evaluation_runs_in_batches_that_cover_every_sample(models):
    x = np.random.default_rng(2).random((513, 20), dtype=np.float32)
    outputs = Evaluator(models["matmul"], "cpu").outputs(x)
    np.testing.assert_allclose(outputs, numpy_forward(models["matmul"], x), rtol=1e-4, atol=1e-4)


def test_cpu_is_always_available_and_says_so(models):
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    assert Evaluator(models["matmul"], "auto").provider in {"CPUExecutionProvider", "CUDAExecutionProvider"}


def test_cuda_asked_for_on_a_machine_without_it_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(AnpError, match="no CUDA device"):
        providers_for("cuda")
