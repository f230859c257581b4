"""Fine-Pruning and CLP as registered methods: thin adapters over `baselines.fine_pruning` and
`baselines.clp`, which decide from the ONNX graph alone (no torch model is needed for that)."""

from __future__ import annotations

import numpy as np

from anp_onnx.methods import baselines
from anp_onnx.methods.registry import Decision, MethodContext, Progress
from anp_onnx.methods.settings import ClpSettings, FinePruningSettings
from anp_onnx.onnx.neurons import NeuronMap
from anp_onnx.prune import MaskValues, PruningPlan


def decide_fine_pruning(
    context: MethodContext, settings: FinePruningSettings, progress: Progress | None = None
) -> Decision:
    """`fine-pruning`: the least active neurons within the held-out accuracy budget."""
    plan = baselines.fine_pruning(
        context.model,
        context.neuron_map,
        context.clean,
        max_acc_drop=settings.max_acc_drop,
        holdout=settings.holdout,
        scope=settings.scope,
        seed=settings.seed,
    )
    return _decided(context.neuron_map, plan, progress)


def decide_clp(context: MethodContext, settings: ClpSettings, progress: Progress | None = None) -> Decision:
    """`clp`: the channels whose Lipschitz bound is an outlier of their layer."""
    return _decided(context.neuron_map, baselines.clp(context.model, context.neuron_map, u=settings.u), progress)


def _decided(neuron_map: NeuronMap, plan: PruningPlan, progress: Progress | None) -> Decision:
    if progress is not None:
        progress(1, 1)  # one step: the baselines decide in one go
    return Decision(plan, plan_masks(neuron_map, plan))


def plan_masks(neuron_map: NeuronMap, plan: PruningPlan) -> MaskValues:
    """The plan as hard masks (0 pruned, 1 kept) with each pruned neuron's value: the scores of methods whose
    own scores do not cover every neuron (the report lists every layer's masks)."""
    masks = {layer.name: np.ones(layer.channels, dtype=np.float32) for layer in neuron_map.layers}
    values = {layer.name: np.zeros(layer.channels) for layer in neuron_map.layers}
    for neuron in plan.neurons:
        masks[neuron.layer][neuron.channel] = 0.0
        values[neuron.layer][neuron.channel] = neuron.value
    return MaskValues(masks=masks, pruned_values=values)
