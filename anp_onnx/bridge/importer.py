"""ONNX -> torch through onnx2torch, with a NeuronGate hooked onto every prunable layer's output."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import torch
from onnx import version_converter
from torch import nn

from anp_onnx.bridge.gates import NeuronGate
from anp_onnx.bridge.normalise import normalised_for_torch
from anp_onnx.errors import AnpError
from anp_onnx.onnx.graph import Graph
from anp_onnx.onnx.neurons import NeuronMap, current_bias
from anp_onnx.prune import PruningPlan

FALLBACK_OPSET = 17  # onnx2torch converts most ops up to this opset
OUTPUT_KINDS = {"Softmax": "probabilities", "LogSoftmax": "log_probabilities", "Sigmoid": "sigmoid"}
SHAPE_ONLY_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"})
TOLERANCE = 1e-3  # torch vs onnxruntime, relative to the largest output (at least 1)
FLOAT16_TOLERANCE = 1e-2  # onnxruntime computes float16 models in float16, torch in float32
PROBABILITY_FLOOR = 1e-7


class GatedClassifier(nn.Module):
    """The converted model with gates; returns the class output only (graph output `output_index`).
    `output_kind` says what that output holds (see `output_kind`); `tolerance` is how far it may be
    from onnxruntime's (relative to the largest output)."""

    def __init__(
        self,
        graph_module: nn.Module,
        neuron_map: NeuronMap,
        gates: list[NeuronGate],
        output_kind: str = "logits",
        output_index: int = 0,
        tolerance: float = TOLERANCE,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.neuron_map = neuron_map
        self.gates = nn.ModuleList(gates)
        self.output_kind = output_kind
        self.output_index = output_index
        self.tolerance = tolerance
        for layer, gate in zip(neuron_map.layers, gates, strict=True):
            _layer_module(graph_module, layer.output_node_index).register_forward_hook(_gate_hook(gate))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.graph_module(inputs)
        return outputs[self.output_index] if isinstance(outputs, (tuple, list)) else outputs

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss the model was trained with, read from what its output holds: cross-entropy for
        logits, softmax probabilities and log-probabilities (all three give the same value);
        for independent per-class sigmoids, binary cross-entropy against the one-hot label, summed
        over classes and averaged over the batch (one-vs-rest training, on the scale of cross-entropy)."""
        outputs = outputs.reshape(len(outputs), -1)
        if self.output_kind == "probabilities":
            return nn.functional.nll_loss(torch.log(outputs.clamp_min(1e-12)), labels)
        if self.output_kind == "log_probabilities":
            return nn.functional.nll_loss(outputs, labels)
        if self.output_kind == "sigmoid":
            targets = nn.functional.one_hot(labels, outputs.shape[1]).to(outputs.dtype)
            probabilities = outputs.clamp(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
            return nn.functional.binary_cross_entropy(probabilities, targets, reduction="sum") / len(outputs)
        return nn.functional.cross_entropy(outputs, labels)

    def batch_norm_modules(self) -> list[nn.Module]:
        return [module for module in self.graph_module.modules() if _is_batch_norm(module)]

    def observe_gate_inputs(
        self, inputs: torch.Tensor, observe: Callable[[int, torch.Tensor], None], batch_size: int = 256
    ) -> None:
        """Run `inputs` through in batches without gradients, calling `observe(gate index, activation)`
        with what each gate receives; the mode (train/eval) is the caller's."""

        def recorder(index: int):
            return lambda _gate, args: observe(index, args[0])

        hooks = [gate.register_forward_pre_hook(recorder(index)) for index, gate in enumerate(self.gates)]
        try:
            with torch.no_grad():
                for start in range(0, len(inputs), batch_size):
                    self(inputs[start : start + batch_size])
        finally:
            for hook in hooks:
                hook.remove()


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
    tolerance = FLOAT16_TOLERANCE if is_float16(model) else TOLERANCE
    return GatedClassifier(graph_module, neuron_map, gates, output_kind(model, output_index), output_index, tolerance)


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


def output_kind(model: onnx.ModelProto, output_index: int = 0) -> str:
    """What the class output holds: 'probabilities' (Softmax), 'log_probabilities' (LogSoftmax),
    'sigmoid' (Sigmoid), or 'logits' (anything else), looking back through shape-only ops."""
    graph = Graph(model)
    name = model.graph.output[output_index].name
    while (producer := graph.producer.get(name)) is not None:
        node = graph.nodes[producer]
        if node.op_type in OUTPUT_KINDS:
            return OUTPUT_KINDS[node.op_type]
        if node.op_type not in SHAPE_ONLY_OPS or not node.input:
            break
        name = node.input[0]
    return "logits"


def is_float16(model: onnx.ModelProto) -> bool:
    """True when the model computes in float16 (its input or any initializer is float16)."""
    float16 = onnx.TensorProto.FLOAT16
    inputs = [value.type.tensor_type.elem_type for value in model.graph.input]
    return float16 in inputs or any(tensor.data_type == float16 for tensor in model.graph.initializer)


def check_equivalence(classifier: GatedClassifier, inputs: np.ndarray, reference: np.ndarray, what: str) -> float:
    """Max abs difference between the torch model and onnxruntime's outputs; AnpError when they disagree
    by more than the classifier's tolerance (relative to the largest output, at least 1)."""
    classifier.eval()
    device = next(classifier.gates.buffers()).device if len(classifier.gates) else torch.device("cpu")
    with torch.no_grad():
        ours = classifier(torch.from_numpy(inputs).float().to(device)).float().cpu().numpy()
    difference = float(np.max(np.abs(ours - reference.astype(np.float32))))
    tolerance = classifier.tolerance * max(1.0, float(np.max(np.abs(reference))))
    if not np.isfinite(difference) or difference > tolerance:
        raise AnpError(f"{what}: the torch conversion disagrees with onnxruntime (max difference {difference:.3g})")
    return difference


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """The module's trainable parameters without gradients inside the block (inputs, masks or
    triggers outside it are what is optimised), trainable again after."""
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def hard_masks(classifier: GatedClassifier, plan: PruningPlan) -> None:
    """Set every gate's mask to 0 for the plan's neurons and 1 elsewhere, noise off."""
    with torch.no_grad():
        for layer, gate in zip(classifier.neuron_map.layers, classifier.gates, strict=True):
            gate.mask.fill_(1.0)
            channels = plan.channels_of(layer.name)
            if channels:
                gate.mask[channels] = 0.0
            gate.perturbed = False
            gate.optimising = False
