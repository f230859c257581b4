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


def fixed_batch_probe(model_path, batch: int) -> onnx.ModelProto:
    """The MatMul MLP in memory, its input fixed to `batch` samples, its first hidden layer exposed as an output."""
    model = onnx.load(str(model_path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    model.graph.output.append(onnx.ValueInfoProto(name="r1"))
    return model


def test_an_in_memory_fixed_batch_model_gives_named_outputs_for_a_short_last_batch(models):
    x = np.random.default_rng(5).random((10, 20), dtype=np.float32)  # batches of 4, 4 and a short 2
    evaluator = Evaluator(fixed_batch_probe(models["matmul"], 4), "cpu")
    assert (evaluator.fixed_batch, evaluator.batch_size, evaluator.output_name) == (True, 4, "logits")
    hidden, logits = evaluator.run(x, ["r1", "logits"])
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(models["matmul"])).graph.initializer}
    np.testing.assert_allclose(hidden, np.maximum(x @ weights["w1"] + weights["b1"], 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, numpy_forward(models["matmul"], x), rtol=1e-4, atol=1e-4)
    assert evaluator.predict(x).tolist() == numpy_forward(models["matmul"], x).argmax(1).tolist()


def test_the_class_output_is_picked_by_name_and_an_unknown_one_is_refused_listing_them(models):
    x = np.random.default_rng(6).random((3, 20), dtype=np.float32)
    probe = fixed_batch_probe(models["matmul"], 3)
    np.testing.assert_array_equal(
        Evaluator(probe, "cpu", output="r1").outputs(x), Evaluator(probe, "cpu").run(x, ["r1"])[0]
    )
    with pytest.raises(AnpError, match="no output named 'probs': the model's outputs are logits, r1"):
        Evaluator(probe, "cpu", output="probs")


def test_an_in_memory_model_onnxruntime_cannot_load_is_a_user_error():
    broken = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("NoSuchOp", ["x"], ["y"])],
            "broken",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    with pytest.raises(AnpError, match=r"^the model: onnxruntime cannot load the model"):
        Evaluator(broken, "cpu")
