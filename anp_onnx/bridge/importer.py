"""ONNX -> torch through onnx2torch, with a NeuronGate hooked onto every prunable layer's output.

Every objective optimises on logits, whatever the model's head: a class output that ends in Softmax,
LogSoftmax or Sigmoid (behind shape-only ops such as Identity, Reshape or Flatten, as Keras, tf2onnx
and PaddlePaddle write it) is recognised, the head's input is made an extra output of the converted
graph, and `GatedClassifier.forward` returns it. Cross-entropy on probabilities would saturate: a
trigger search on them stalls where the target's probability is still near 0 (issue 24). The head
changes no argmax; where the torch model is compared with onnxruntime, `class_output` is what the
graph itself outputs, head included.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

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
# The graph's head, by the op that ends the class output; "logits" when there is none.
OUTPUT_KINDS = {"Softmax": "probabilities", "LogSoftmax": "log_probabilities", "Sigmoid": "sigmoid"}
SHAPE_ONLY_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"})
# onnx2torch's Slice indexes with a list of slices (node_converters/slice.py: `x[pos_axes_slices]`), which
# torch deprecates with a UserWarning the first time a model's Slice runs (exporters write Shape -> Slice
# before a Reshape, for one). Torch still reads the list as a tuple; were that to change,
# check_equivalence would refuse the model, so the warning tells users nothing: it is ignored for that
# message from that module only.
warnings.filterwarnings(
    "ignore",
    message="Using a non-tuple sequence for multidimensional indexing",
    category=UserWarning,
    module=r"onnx2torch\.node_converters\.slice",
)
TOLERANCE = 1e-3  # torch vs onnxruntime, relative to the largest output (at least 1)
FLOAT16_TOLERANCE = 1e-2  # onnxruntime computes float16 models in float16, torch in float32


@dataclass(frozen=True)
class Head:
    """The op that turns logits into the class output: `kind` (an OUTPUT_KINDS value) and `logits`,
    the name of the tensor it reads."""

    kind: str
    logits: str


class GatedClassifier(nn.Module):
    """The converted model with gates. `forward` returns the logits of the class output (graph output
    `output_index`): the head's input where the class output ends in a head (module outputs
    `logits_index`), the class output itself otherwise; `class_output` returns what the graph
    outputs. `output_kind` names the head ("logits" for none); `tolerance` is how far the class output
    may be from onnxruntime's (relative to the largest output)."""

    def __init__(
        self,
        graph_module: nn.Module,
        neuron_map: NeuronMap,
        gates: list[NeuronGate],
        output_kind: str = "logits",
        output_index: int = 0,
        tolerance: float = TOLERANCE,
        logits_index: int | None = None,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.neuron_map = neuron_map
        self.gates = nn.ModuleList(gates)
        self.output_kind = output_kind
        self.output_index = output_index
        self.tolerance = tolerance
        self.logits_index = logits_index
        for layer, gate in zip(neuron_map.layers, gates, strict=True):
            _layer_module(graph_module, layer.output_node_index).register_forward_hook(_gate_hook(gate))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The logits, in the class output's shape (a head behind Reshape/Flatten keeps their shape)."""
        outputs = self.graph_module(inputs)
        if self.logits_index is None:
            return _pick(outputs, self.output_index)
        logits, classes = outputs[self.logits_index], outputs[self.output_index]
        return logits.reshape(classes.shape) if logits.numel() == classes.numel() else logits

    def class_output(self, inputs: torch.Tensor) -> torch.Tensor:
        """The class output as the graph computes it, head included (what onnxruntime returns)."""
        return _pick(self.graph_module(inputs), self.output_index)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss the model was trained with, on `forward`'s logits: cross-entropy for a softmax,
        log-softmax or no head (the same value for all three); for independent per-class sigmoids,
        binary cross-entropy against the one-hot label, summed over classes and averaged over the
        batch (one-vs-rest training, on the scale of cross-entropy)."""
        logits = logits.reshape(len(logits), -1)
        if self.output_kind == "sigmoid":
            targets = nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
            return nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)
        return nn.functional.cross_entropy(logits, labels)

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


def _pick(outputs: torch.Tensor | tuple | list, index: int) -> torch.Tensor:
    return outputs[index] if isinstance(outputs, (tuple, list)) else outputs


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
    `output_index` picks the class output among the graph outputs; a head on it is looked through
    (see the module docstring)."""
    head = output_head(model, output_index)
    outputs = [value.name for value in model.graph.output]
    extra = [head.logits] if head is not None and head.logits not in outputs else []
    graph_module = convert_to_torch(model, extra)
    logits_index = None if head is None else [*outputs, *extra].index(head.logits)
    graph = Graph(model)
    gates = [
        NeuronGate(layer, current_bias(graph, layer), renormalise and not layer.batch_normalised)
        for layer in neuron_map.layers
    ]
    tolerance = FLOAT16_TOLERANCE if is_float16(model) else TOLERANCE
    kind = "logits" if head is None else head.kind
    return GatedClassifier(graph_module, neuron_map, gates, kind, output_index, tolerance, logits_index)


def convert_to_torch(model: onnx.ModelProto, extra_outputs: Sequence[str] = ()) -> nn.Module:
    """onnx2torch conversion of the normalised graph, with the tensors `extra_outputs` (not graph
    outputs already) output after the graph's own; retries at opset 17 for ops it lacks."""
    import onnx2torch

    normalised = normalised_for_torch(model)
    normalised.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in extra_outputs)
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
    head = output_head(model, output_index)
    return "logits" if head is None else head.kind


def output_head(model: onnx.ModelProto, output_index: int = 0) -> Head | None:
    """The Softmax, LogSoftmax or Sigmoid that ends the class output, looking back through shape-only
    ops (Identity, Reshape, Flatten, ...); None when it ends in anything else."""
    graph = Graph(model)
    name = model.graph.output[output_index].name
    while (producer := graph.producer.get(name)) is not None:
        node = graph.nodes[producer]
        if node.op_type in OUTPUT_KINDS and node.input and node.input[0] in graph.producer:
            return Head(OUTPUT_KINDS[node.op_type], node.input[0])
        if node.op_type not in SHAPE_ONLY_OPS or not node.input:
            break
        name = node.input[0]
    return None


def is_float16(model: onnx.ModelProto) -> bool:
    """True when the model computes in float16 (its input or any initializer is float16)."""
    float16 = onnx.TensorProto.FLOAT16
    inputs = [value.type.tensor_type.elem_type for value in model.graph.input]
    return float16 in inputs or any(tensor.data_type == float16 for tensor in model.graph.initializer)


def check_equivalence(classifier: GatedClassifier, inputs: np.ndarray, reference: np.ndarray, what: str) -> float:
    """Max abs difference between the torch model's class output (head included) and onnxruntime's;
    AnpError when they disagree by more than the classifier's tolerance (relative to the largest
    output, at least 1)."""
    classifier.eval()
    device = next(classifier.gates.buffers()).device if len(classifier.gates) else torch.device("cpu")
    with torch.no_grad():
        ours = classifier.class_output(torch.from_numpy(inputs).float().to(device)).float().cpu().numpy()
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
