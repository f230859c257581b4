import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from anp_onnx.bridge.importer import convert_to_torch
from anp_onnx.bridge.normalise import normalised_for_torch
from anp_onnx.errors import AnpError
from anp_onnx.onnx.graph import Graph, data_inputs
from anp_onnx.onnx.model import class_output_index, graph_input, load_model


def test_torchscript_export_with_kept_batch_norm_has_identity_initializers(models):
    model = onnx.load(str(models["batchnorm"]))
    graph = Graph(model)
    identities = [node for node in model.graph.node if node.op_type == "Identity"]
    assert identities, "the PRESERVE export should emit Identity nodes on BatchNorm weights"
    assert all(graph.resolve_initializer(node.output[0]) == node.input[0] for node in identities)


def test_normalisation_removes_identity_initializers_and_names_nodes_by_position(models):
    model = onnx.load(str(models["batchnorm"]))
    normalised = normalised_for_torch(model)
    assert not [node for node in normalised.graph.node if node.op_type == "Identity"]
    kept_positions = [index for index, node in enumerate(model.graph.node) if node.op_type != "Identity"]
    assert [node.name for node in normalised.graph.node] == [f"node_{index}" for index in kept_positions]
    assert len(model.graph.node) > len(normalised.graph.node), "the input model itself is left as it was"


def test_the_normalised_export_converts_and_agrees_with_onnxruntime(models, image_samples):
    model = onnx.load(str(models["batchnorm"]))
    module = convert_to_torch(model).eval()
    x = np.load(image_samples)["x"][:8]
    expected = ort.InferenceSession(str(models["batchnorm"]), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    with torch.no_grad():
        actual = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(actual, expected[0], atol=1e-5)


def test_load_model_names_the_problem(tmp_path):
    with pytest.raises(AnpError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07this is not a protobuf\xff\xff")
    with pytest.raises(AnpError, match="not a readable ONNX model"):
        load_model(corrupt)


def test_a_model_with_external_data_loads_from_beside_it(tmp_path, models):
    model = onnx.load(str(models["folded"]))
    onnx.save_model(
        model, str(tmp_path / "external.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    loaded = load_model(tmp_path / "external.onnx")
    original = onnx.load(str(models["folded"]))  # save_model moved the data out of `model`
    assert [t.raw_data for t in loaded.graph.initializer] == [t.raw_data for t in original.graph.initializer]


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_outside_the_model_folder_is_refused_before_reading(tmp_path, models, location):
    model = onnx.load(str(models["folded"]))
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    hostile = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in hostile.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (folder / "m.onnx").write_bytes(hostile.SerializeToString())
    with pytest.raises(AnpError, match="points outside the model's folder"):
        load_model(folder / "m.onnx")


def test_data_inputs_leave_out_initializers_listed_as_graph_inputs(models):
    """IR < 4 lists every initializer among the graph inputs; only the image input takes data."""
    model = onnx.load(str(models["matmul"]))
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        for tensor in model.graph.initializer
    )
    assert len(model.graph.input) == 6
    assert [value.name for value in data_inputs(model)] == ["input"]
    assert graph_input(model).name == "input"


def test_the_class_output_is_found_alike_in_a_model_and_in_a_list_of_output_names(models):
    model = onnx.load(str(models["matmul"]))
    model.graph.output.append(onnx.ValueInfoProto(name="r1"))
    for outputs in (model, ["logits", "r1"]):
        assert (class_output_index(outputs, None), class_output_index(outputs, "r1")) == (0, 1)
        with pytest.raises(AnpError, match="no output named 'probs': the model's outputs are logits, r1"):
            class_output_index(outputs, "probs")
