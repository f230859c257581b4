"""Two pruning baselines that decide a `PruningPlan` for the same rewriter ANP uses.

- Fine-Pruning, pruning only (Liu et al., RAID 2018): neurons that stay dormant on clean data are
  where a backdoor can hide; prune the least active ones. Activations are measured by onnxruntime on
  the ONNX graph itself (the neuron map names the tensor that carries each layer's channels), so no
  conversion sits between the file and the ranking. How many: the most neurons, least active first,
  whose accuracy on a held-out part of the clean data drops by at most a budget (the paper prunes
  until validation accuracy falls).
- CLP, Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022), data-free: a channel's upper
  bound on its Lipschitz constant (UCLC) is the spectral norm of its weight slice, times
  |gamma| / sqrt(var + eps) when a kept BatchNormalization carries the neurons; channels whose UCLC
  exceeds mean + u * std of their layer are pruned (u = 3).

Both silence a pruned neuron as their papers do (its output becomes 0; where the bias is not one
per channel the channel keeps that bias, the only constant the rewriter can write there).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
import onnx

from anp_onnx import prune
from anp_onnx.data import Samples, split_holdout
from anp_onnx.errors import AnpError
from anp_onnx.onnx.graph import Graph
from anp_onnx.onnx.neurons import Layer, NeuronMap, current_bias
from anp_onnx.onnx.rewrite import apply_plan
from anp_onnx.prune import MaskValues, PrunedNeuron, PruningPlan
from anp_onnx.validate.evaluate import Evaluator

CLP_DEFAULT_U = 3.0
FINE_PRUNING_SCOPES = ("head", "all")
# onnxruntime on the CPU, as the bench measured them: a ranking does not move with the machine it runs on
BASELINE_DEVICE = "cpu"


# ----------------------------------------------------------------------------- shared


def silenced_values(graph: Graph, layer: Layer) -> np.ndarray:
    """What each channel outputs once pruned by a baseline: 0, or its bias where that is not per channel."""
    return np.zeros(layer.channels) if layer.bias_per_channel else current_bias(graph, layer)


# ----------------------------------------------------------------------------- Fine-Pruning


def head_layers(model: onnx.ModelProto, neuron_map: NeuronMap) -> list[Layer]:
    """The prunable layers with no other prunable layer downstream: the last ones before the classifier
    head (Fine-Pruning's "last convolutional layer"; both branches of a final residual Add)."""
    graph = Graph(model)
    layer_nodes = {layer.node_index for layer in neuron_map.layers}
    sinks = []
    for layer in neuron_map.layers:
        start = graph.nodes[layer.output_node_index].output[0]
        queue, seen, downstream = deque([start]), {start}, False
        while queue and not downstream:
            for index in graph.consumers.get(queue.popleft(), []):
                if index in layer_nodes:
                    downstream = True
                    break
                for output in graph.nodes[index].output:
                    if output and output not in seen:
                        seen.add(output)
                        queue.append(output)
        if not downstream:
            sinks.append(layer)
    return sinks


def mean_activations(model: onnx.ModelProto, layers: list[Layer], x: np.ndarray) -> dict[str, np.ndarray]:
    """Per channel, the mean of max(0, activation) over samples (and positions), measured by onnxruntime
    with each layer's output tensor exposed as an extra graph output."""
    graph = Graph(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    tensors = [graph.nodes[layer.output_node_index].output[0] for layer in layers]
    existing = {output.name for output in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name not in existing)
    values = Evaluator(probe, BASELINE_DEVICE).run(x, tensors)
    means = {}
    for layer, activation in zip(layers, values, strict=True):
        channels_last = np.moveaxis(np.maximum(activation, 0.0), layer.channel_axis, -1)
        means[layer.name] = channels_last.reshape(-1, layer.channels).mean(axis=0, dtype=np.float64)
    return means


def fine_pruning_scores(
    model: onnx.ModelProto, neuron_map: NeuronMap, x: np.ndarray, scope: str = "head"
) -> MaskValues:
    """Activation scores in the form plans are made from (smallest first = least active first).
    `scope` "head": the layers before the head, raw mean activations; "all": every layer, each
    layer's activations divided by that layer's mean so that layers of different scale compare."""
    if scope not in FINE_PRUNING_SCOPES:
        raise AnpError(f"unknown Fine-Pruning scope {scope!r}: use one of {', '.join(FINE_PRUNING_SCOPES)}")
    layers = head_layers(model, neuron_map) if scope == "head" else list(neuron_map.layers)
    activations = mean_activations(model, layers, x)
    if scope == "all":
        activations = {name: values / max(float(values.mean()), 1e-12) for name, values in activations.items()}
    graph = Graph(model)
    return MaskValues(
        masks={layer.name: activations[layer.name].astype(np.float32) for layer in layers},
        pruned_values={layer.name: silenced_values(graph, layer) for layer in layers},
    )


def held_out_accuracy(
    model: onnx.ModelProto, neuron_map: NeuronMap, held_out: Samples
) -> Callable[[PruningPlan], float]:
    """Accuracy of the rewritten model on `held_out` (its first output's classes), through the rewriter
    and onnxruntime."""

    def accuracy_of(plan: PruningPlan) -> float:
        predictions = Evaluator(apply_plan(model, neuron_map, plan), BASELINE_DEVICE).predict(held_out.x)
        return float(np.mean(predictions == held_out.y))

    return accuracy_of


def fine_pruning(
    model: onnx.ModelProto,
    neuron_map: NeuronMap,
    clean: Samples,
    *,
    max_acc_drop: float = 0.02,
    holdout: float = 0.2,
    scope: str = "head",
    seed: int = 0,
) -> PruningPlan:
    """Prune the least active neurons on clean data: the most of them (up to half the ranked ones)
    whose held-out clean accuracy drops by at most `max_acc_drop`."""
    ranking_samples, held_out = split_holdout(clean, holdout, seed)
    scores = fine_pruning_scores(model, neuron_map, ranking_samples.x, scope)
    chosen = prune.by_accuracy_budget(scores, max_acc_drop, held_out_accuracy(model, neuron_map, held_out))
    return PruningPlan(f"fine-pruning:{scope},max-acc-drop={max_acc_drop:g}", chosen.neurons)


# ----------------------------------------------------------------------------- CLP


def _channel_matrices(graph: Graph, layer: Layer) -> np.ndarray | None:
    """The weight slice of every output channel as a matrix (channels, inputs, kernel positions), or
    None for a BatchNormalization with no constant-weight Conv/Gemm/MatMul before it."""
    node = graph.nodes[layer.node_index]
    if layer.batch_normalised:
        producer = graph.producer.get(node.input[0])
        if producer is None:
            return None
        weight_node = graph.nodes[producer]
        if weight_node.op_type != "Conv" or len(weight_node.input) < 2:
            return None
        weight = graph.constant(weight_node.input[1])
        if weight is None:
            return None
        return weight.reshape(weight.shape[0], weight.shape[1], -1).astype(np.float64)
    weight = graph.constant(node.input[1]).astype(np.float64)
    weight = np.moveaxis(weight, layer.weight_axis, 0)
    return weight.reshape(weight.shape[0], weight.shape[1] if weight.ndim > 1 else 1, -1)


def _batch_norm_gain(graph: Graph, layer: Layer) -> np.ndarray:
    """|gamma| / sqrt(var + eps) per channel of a BatchNormalization layer."""
    node = graph.nodes[layer.node_index]
    gamma, variance = graph.constant(node.input[1]), graph.constant(node.input[4])
    epsilon = next((attribute.f for attribute in node.attribute if attribute.name == "epsilon"), 1e-5)
    return np.abs(gamma.astype(np.float64)) / np.sqrt(variance.astype(np.float64) + epsilon)


def channel_lipschitz(model: onnx.ModelProto, neuron_map: NeuronMap) -> dict[str, np.ndarray]:
    """UCLC of every neuron, per layer: spectral norm of the channel's weight slice (an L2 norm for
    Gemm/MatMul rows), times the BatchNorm gain where BatchNormalization carries the neurons.
    Uses the initializers only."""
    graph = Graph(model)
    bounds = {}
    for layer in neuron_map.layers:
        matrices = _channel_matrices(graph, layer)
        norms = np.ones(layer.channels) if matrices is None else np.linalg.norm(matrices, ord=2, axis=(1, 2))
        if layer.batch_normalised:
            norms = norms * _batch_norm_gain(graph, layer)
        bounds[layer.name] = norms
    return bounds


def clp(model: onnx.ModelProto, neuron_map: NeuronMap, u: float = CLP_DEFAULT_U) -> PruningPlan:
    """Prune, in every layer, the channels whose UCLC exceeds the layer's mean + u * std (largest first)."""
    graph = Graph(model)
    all_bounds = channel_lipschitz(model, neuron_map)
    chosen: list[PrunedNeuron] = []
    for layer in neuron_map.layers:
        bounds = all_bounds[layer.name]
        if len(bounds) < 2:
            continue
        limit = bounds.mean() + u * bounds.std(ddof=1)
        values = silenced_values(graph, layer)
        for channel in np.flatnonzero(bounds > limit)[np.argsort(-bounds[bounds > limit])]:
            chosen.append(PrunedNeuron(layer.name, int(channel), float(bounds[channel]), float(values[channel])))
    return PruningPlan(f"clp:u={u:g}", tuple(chosen))
