"""ONNX -> torch through onnx2torch, with a NeuronGate hooked onto every prunable layer's output."""

from __future__ import annotations

import contextlib
import io
import re
import warnings

import numpy as np
import onnx
import torch
from onnx import version_converter
from torch import nn

from anp_onnx.errors import AnpError
from anp_onnx.gates import NeuronGate
from anp_onnx.model import Graph, normalised_for_torch
from anp_onnx.neurons import NeuronMap, current_bias

FALLBACK_OPSET = 17  # onnx2torch converts most ops up to this opset
PROBABILITY_OPS = frozenset({"Softmax"})


class GatedClassifier(nn.Module):
    """The converted model with gates; returns the class output only (graph output `output_index`)."""

    def __init__(
        self,
        graph_module: nn.Module,
        neuron_map: NeuronMap,
        gates: list[NeuronGate],
        outputs_probabilities: bool,
        output_index: int = 0,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.neuron_map = neuron_map
        self.gates = nn.ModuleList(gates)
        self.outputs_probabilities = outputs_probabilities
        self.output_index = output_index
        for layer, gate in zip(neuron_map.layers, gates, strict=True):
            _layer_module(graph_module, layer.output_node_index).register_forward_hook(_gate_hook(gate))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.graph_module(inputs)
        return outputs[self.output_index] if isinstance(outputs, (tuple, list)) else outputs

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, whether the model outputs logits or probabilities."""
        if self.outputs_probabilities:
            return nn.functional.nll_loss(torch.log(outputs.clamp_min(1e-12)), labels)
        return nn.functional.cross_entropy(outputs, labels)

    def batch_norm_modules(self) -> list[nn.Module]:
        return [module for module in self.graph_module.modules() if _is_batch_norm(module)]


def _layer_module(graph_module: nn.Module, node_index: int) -> nn.Module:
    """The converted module of node `node_index` (named `node_<index>` by normalised_for_torch)."""
    try:
        return graph_module.get_submodule(f"node_{node_index}")
    except AttributeError:
        raise AnpError(f"node {node_index} was lost in the conversion to torch (renamed or merged)") from None


def _gate_hook(gate: NeuronGate):
    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return gate(output)

    return hook


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).__name__ == "OnnxBatchNorm"


def import_model(
    model: onnx.ModelProto, neuron_map: NeuronMap, renormalise: bool, output_index: int = 0
) -> GatedClassifier:
    """Convert with onnx2torch and hook gates on. `renormalise` re-creates train-mode BatchNorm on
    layers that have none (see gates.py); BatchNormalization layers always use their own.
    `output_index` picks the class output among the graph outputs."""
    graph_module = convert_to_torch(model)
    graph = Graph(model)
    gates = [
        NeuronGate(layer, current_bias(graph, layer), renormalise and not layer.batch_normalised)
        for layer in neuron_map.layers
    ]
    probabilities = outputs_probabilities(model, output_index)
    return GatedClassifier(graph_module, neuron_map, gates, probabilities, output_index)


def convert_to_torch(model: onnx.ModelProto) -> nn.Module:
    """onnx2torch conversion of the normalised graph; retries at opset 17 for ops it lacks."""
    import onnx2torch

    normalised = normalised_for_torch(model)
    try:
        return _quiet(onnx2torch.convert, normalised)
    except NotImplementedError as error:
        first_error = error
    try:
        converted = version_converter.convert_version(normalised, FALLBACK_OPSET)
        return _quiet(onnx2torch.convert, converted)
    except Exception:  # the converter fails in many ways; report the original reason
        pass
    raise AnpError(f"cannot convert to torch: {_describe(first_error)}")


def _describe(error: Exception) -> str:
    text = str(error)
    match = re.search(r"operation_type='(\w+)', version=(\d+)", text)
    if match:
        return f"onnx2torch has no converter for {match.group(1)} (opset {match.group(2)})"
    return text.splitlines()[0] if text else type(error).__name__


def _quiet(function, *args):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return function(*args)


def outputs_probabilities(model: onnx.ModelProto, output_index: int = 0) -> bool:
    """True when the class output is produced by a Softmax (probabilities, not logits)."""
    graph = Graph(model)
    producer = graph.producer.get(model.graph.output[output_index].name)
    return producer is not None and graph.nodes[producer].op_type in PROBABILITY_OPS


def check_equivalence(classifier: GatedClassifier, inputs: np.ndarray, reference: np.ndarray, what: str) -> float:
    """Max abs difference between the torch model and onnxruntime's outputs; AnpError when they disagree."""
    classifier.eval()
    device = next(classifier.gates.buffers()).device if len(classifier.gates) else torch.device("cpu")
    with torch.no_grad():
        ours = classifier(torch.from_numpy(inputs).to(device)).float().cpu().numpy()
    difference = float(np.max(np.abs(ours - reference)))
    tolerance = 1e-3 * max(1.0, float(np.max(np.abs(reference))))
    if not np.isfinite(difference) or difference > tolerance:
        raise AnpError(f"{what}: the torch conversion disagrees with onnxruntime (max difference {difference:.3g})")
    return difference
