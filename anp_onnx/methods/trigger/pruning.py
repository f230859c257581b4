"""Prune, one neuron at a time, what synthetic triggers rely on, within a clean-accuracy budget.

Each round ranks the unpruned neurons by how much a synthetic trigger raises their activation
(z-score within their layer, the largest over the triggers), takes the top `candidates` and, when a
ranking is given (`unlearning.py`: masks unlearned against the triggers), the first
`ranked_candidates` unpruned neurons of it too, tries them one by one with the others' current
state, and prunes the one that leaves the lowest `synthetic ASR + clean
accuracy drop`, where the synthetic ASR is the highest over the triggers. It stops when the
synthetic ASR is at most `max_asr`, when the best candidate would cost more than `max_acc_drop` of
clean accuracy (that candidate is not pruned), or after `max_rounds`. Only clean data decides: the
synthetic ASR is measured on clean inputs stamped with the synthetic triggers.

Triggers that do not reach their label to begin with (the best sends fewer than `min_trigger_success`
of the clean inputs there; a working synthesis gets near 1 on backdoored and clean models alike) stand
in for no attack: nothing is pruned, and the result says the synthesis failed
(`synthesis_failed`) rather than that the synthetic ASR is low, so that no verdict calls the model
clean or purified on their word (issue 24: probabilities fed to cross-entropy did this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice

import torch

from anp_onnx.bridge.fast_eval import fast_eval
from anp_onnx.bridge.importer import GatedClassifier, hard_masks
from anp_onnx.methods.trigger.synthesis import Trigger, hit_rate
from anp_onnx.prune import PrunedNeuron, PruningPlan, within_budget


@dataclass(frozen=True)
class TriggerPruningSettings:
    candidates: int = 48  # by activation rise
    ranked_candidates: int = 16  # from the given ranking
    screen_samples: int = 200  # candidates are screened on this many clean and stamped samples each,
    finalists: int = 4  # and this many of the best screened are measured on all of them
    max_asr: float = 0.03  # the synthetic ASR underestimates the real one (docs/METHOD.md): a margin under 5%
    max_acc_drop: float = 0.03
    max_rounds: int = 40
    min_trigger_success: float = 0.5  # below this before pruning, the synthesis failed


@dataclass(frozen=True)
class PruningRound:
    layer: str
    channel: int
    clean_accuracy: float
    synthetic_asr: float


@dataclass
class TriggerPruningResult:
    plan: PruningPlan
    clean_accuracy_before: float
    synthetic_asr_before: float
    rounds: list[PruningRound] = field(default_factory=list)
    stopped_because: str = ""
    synthesis_failed: bool = False  # the triggers never reached their label: no evidence either way,
    # and no verdict may call the model clean or purified

    @property
    def synthetic_asr_after(self) -> float:
        return self.rounds[-1].synthetic_asr if self.rounds else round(self.synthetic_asr_before, 4)

    def summary(self) -> dict[str, object]:
        return {
            "clean_accuracy_before": round(self.clean_accuracy_before, 4),
            "synthetic_asr_before": round(self.synthetic_asr_before, 4),
            "synthetic_asr_after": self.synthetic_asr_after,
            "rounds": [asdict(step) for step in self.rounds],
            "stopped_because": self.stopped_because,
            "synthesis_failed": self.synthesis_failed,
        }


def prune_against_trigger(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    triggers: Trigger | list[Trigger],
    settings: TriggerPruningSettings | None = None,
    on_round: Callable[[PruningRound], None] | None = None,
    ranking: list[tuple[int, int]] | None = None,
) -> TriggerPruningResult:
    """Greedy pruning on clean data `x, y` against `triggers`; the classifier's masks end hard (0/1).
    `ranking` lists (gate index, channel) pairs, the most suspect first."""
    with fast_eval(classifier):
        return _greedy_rounds(classifier, x, y, triggers, settings or TriggerPruningSettings(), on_round, ranking)


def _greedy_rounds(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    triggers: Trigger | list[Trigger],
    settings: TriggerPruningSettings,
    on_round: Callable[[PruningRound], None] | None,
    ranking: list[tuple[int, int]] | None,
) -> TriggerPruningResult:
    triggers = [triggers] if isinstance(triggers, Trigger) else triggers
    clean_inputs = [x[y != trigger.target] for trigger in triggers]
    stamped = [trigger.stamp(others) for trigger, others in zip(triggers, clean_inputs, strict=True)]
    targets = [
        torch.full((len(batch),), trigger.target, device=x.device)
        for trigger, batch in zip(triggers, stamped, strict=True)
    ]
    pairs = list(zip(classifier.neuron_map.layers, classifier.gates, strict=True))
    hard_masks(classifier, PruningPlan("none", ()))

    screen = settings.screen_samples

    def measure(limit: int | None = None) -> tuple[float, float]:
        asr = max(
            hit_rate(classifier, batch[:limit], target[:limit]) for batch, target in zip(stamped, targets, strict=True)
        )
        return hit_rate(classifier, x[:limit], y[:limit]), asr

    baseline, synthetic = measure()
    screen_baseline = measure(screen)[0]
    result = TriggerPruningResult(PruningPlan("trigger", ()), baseline, synthetic)
    pruned: list[PrunedNeuron] = []
    if synthetic < settings.min_trigger_success:
        result.synthesis_failed = True
        labels = ", ".join(str(trigger.target) for trigger in triggers)
        result.stopped_because = (
            f"trigger synthesis failed: the synthetic triggers send {synthetic:.3f} of clean inputs to label "
            f"{labels} (< {settings.min_trigger_success:g}) before pruning; nothing to prune against"
        )
    while not result.synthesis_failed:
        if synthetic <= settings.max_asr:
            result.stopped_because = f"synthetic ASR {synthetic:.3f} <= {settings.max_asr:g}"
            break
        if len(pruned) >= settings.max_rounds:
            result.stopped_because = f"{settings.max_rounds} rounds"
            break
        candidates = _ranked_by_rise(classifier, clean_inputs, stamped)[: settings.candidates]
        if ranking:
            unpruned = (neuron for neuron in ranking if classifier.gates[neuron[0]].mask[neuron[1]] != 0)
            candidates = list(dict.fromkeys(candidates + list(islice(unpruned, settings.ranked_candidates))))
        screened = sorted(
            candidates,
            key=lambda neuron: _score(*_measure_pruned(pairs, neuron, partial(measure, screen)), screen_baseline),
        )
        best: tuple[float, int, int, float, float] | None = None
        for layer_index, channel in screened[: settings.finalists]:
            accuracy, asr = _measure_pruned(pairs, (layer_index, channel), measure)
            score = _score(accuracy, asr, baseline)
            if best is None or score < best[0]:
                best = (score, layer_index, channel, accuracy, asr)
        if best is None:
            result.stopped_because = "no neuron left to prune"
            break
        _, layer_index, channel, accuracy, synthetic_after = best
        if not within_budget(baseline - accuracy, settings.max_acc_drop):
            result.stopped_because = f"next neuron would cost {baseline - accuracy:.3f} of clean accuracy"
            break
        layer, gate = pairs[layer_index]
        with torch.no_grad():
            gate.mask[channel] = 0.0
        pruned.append(PrunedNeuron(layer.name, channel, 0.0, float(gate.pruned_value[channel])))
        synthetic = synthetic_after
        step = PruningRound(layer.name, channel, round(accuracy, 4), round(synthetic_after, 4))
        result.rounds.append(step)
        if on_round is not None:
            on_round(step)
    result.plan = PruningPlan(
        f"trigger: synthetic ASR <= {settings.max_asr:g}, clean ACC drop <= {settings.max_acc_drop:g}", tuple(pruned)
    )
    return result


def _score(accuracy: float, asr: float, baseline: float) -> float:
    """What a round minimises: the synthetic ASR plus the clean accuracy lost."""
    return asr + max(0.0, baseline - accuracy)


def _measure_pruned(
    pairs: list, neuron: tuple[int, int], measure: Callable[[], tuple[float, float]]
) -> tuple[float, float]:
    """`measure()` with one more neuron pruned; the neuron is restored after."""
    gate = pairs[neuron[0]][1]
    with torch.no_grad():
        gate.mask[neuron[1]] = 0.0
    try:
        return measure()
    finally:
        with torch.no_grad():
            gate.mask[neuron[1]] = 1.0


def _ranked_by_rise(
    classifier: GatedClassifier, clean: list[torch.Tensor], stamped: list[torch.Tensor]
) -> list[tuple[int, int]]:
    """Unpruned neurons, largest activation rise under a trigger first (z-score within the layer, the
    largest over the triggers; `clean[i]` are the inputs `stamped[i]` was stamped on)."""
    rises = [
        [
            after - before
            for before, after in zip(
                _mean_activations(classifier, inputs), _mean_activations(classifier, batch), strict=True
            )
        ]
        for inputs, batch in zip(clean, stamped, strict=True)
    ]
    scored: list[tuple[float, int, int]] = []
    for index, gate in enumerate(classifier.gates):
        z = torch.stack([_z_score(per_trigger[index]) for per_trigger in rises]).amax(dim=0)
        scored += [(float(z[channel]), index, channel) for channel in range(len(z)) if gate.mask[channel] != 0]
    scored.sort(key=lambda item: -item[0])
    return [(index, channel) for _, index, channel in scored]


def _z_score(values: torch.Tensor) -> torch.Tensor:
    return (values - values.mean()) / (values.std() + 1e-8) if len(values) > 1 else values


def _mean_activations(classifier: GatedClassifier, inputs: torch.Tensor, batch_size: int = 512) -> list[torch.Tensor]:
    """Each gated layer's mean rectified activation per channel (what the gate receives)."""
    totals: list[torch.Tensor | None] = [None] * len(classifier.gates)
    axes_of = [gate.channel_axis for gate in classifier.gates]

    def add(index: int, activation: torch.Tensor) -> None:
        channel_axis = axes_of[index] % activation.ndim
        total = activation.relu().sum(dim=[axis for axis in range(activation.ndim) if axis != channel_axis])
        totals[index] = total if totals[index] is None else totals[index] + total

    classifier.observe_gate_inputs(inputs, add, batch_size)
    return [total / len(inputs) for total in totals]  # per-sample sums: the scale is the same for both sets
