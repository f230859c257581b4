"""A trigger synthesised from clean data for one label (after Neural Cleanse, Wang et al. S&P 2019).

    stamped = (1 - m) * x + m * pattern,   min  CE(f(stamped), target) + size_weight * mean(m)

with f the model's logits (the input of a trailing Softmax, bridge/importer.py) and CE its training
loss (`GatedClassifier.loss`).

Two shapes of `m`: a "patch" mask covers the input's positions (one value per pixel, shared by the
channels; one per feature for flat inputs), as Neural Cleanse; a "blend" mask is one opacity for the
whole input, a full-image pattern blended in, as Blend-style attacks do (a patch models those
poorly). The pattern stays inside the clean data's value range. A backdoored model's target label
is reached with a small mask (or a low opacity); the synthetic trigger then stands in for the
attacker's, which the defence never sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anp_onnx.bridge.fast_eval import bypassed_identity_gates, fast_eval, reduced_precision
from anp_onnx.bridge.importer import GatedClassifier, frozen_parameters
from anp_onnx.data import is_channels_last
from anp_onnx.errors import AnpError

KINDS = ("patch", "blend")
ANY_LABEL = -1  # the target of an untargeted trigger (`synthesise_trigger`)
SIZE_WEIGHTS = {"patch": 3.0, "blend": 1.0}  # weight of the mask's mean against the target loss
INITIAL_MASKS = {"patch": 0.05, "blend": 0.12}


@dataclass(frozen=True)
class TriggerSettings:
    kind: str = "patch"
    steps: int = 400
    batch_size: int = 128
    lr: float = 0.1
    seed: int = 0
    bfloat16: bool = True  # compute the model in bfloat16 where native (fast_eval.reduced_precision)


@dataclass
class Trigger:
    """`mask` and `pattern` broadcast against one input; `success`: share of clean inputs of other
    labels that the stamp sends to `target`; `size`: the mask's sum (pixels or features for a patch,
    the opacity for a blend)."""

    kind: str
    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    success: float
    size: float

    def stamp(self, inputs: torch.Tensor) -> torch.Tensor:
        return (1 - self.mask) * inputs + self.mask * self.pattern

    def summary(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "target": self.target,
            "success": round(self.success, 4),
            "size": round(self.size, 3),
        }


def channel_axis_of(inputs: torch.Tensor) -> int | None:
    """The channel axis of image batches (NCHW or NHWC by the smaller side); None for other inputs."""
    if inputs.ndim != 4:
        return None
    return 3 if is_channels_last(tuple(inputs.shape)) else 1


def synthesise_trigger(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    target: int,
    settings: TriggerSettings | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Trigger:
    """Optimise a mask and pattern that send clean inputs of other labels to `target`; with `target`
    `ANY_LABEL`, that send clean inputs off their own label, wherever to (an untargeted trigger:
    `success` is then the share of clean inputs it moves)."""
    settings = settings or TriggerSettings()
    untargeted = target == ANY_LABEL
    chosen = torch.ones_like(y, dtype=torch.bool) if untargeted else y != target
    others, other_labels = x[chosen], y[chosen]
    if len(others) == 0:
        raise AnpError(f"every clean sample is labelled {target}: no other label to synthesise a trigger from")
    generator = torch.Generator(device=x.device).manual_seed(settings.seed)
    axis = channel_axis_of(x)
    mask_shape = [1, *x.shape[1:]]
    if axis is not None:
        mask_shape[axis] = 1
    if settings.kind == "blend":
        mask_shape = [1] * x.ndim
    low, high = value_range(x, axis)
    initial = torch.logit(torch.tensor(INITIAL_MASKS[settings.kind])).item()
    mask_logit = torch.full(mask_shape, initial, device=x.device, requires_grad=True)
    pattern_logit = torch.zeros((1, *x.shape[1:]), device=x.device, requires_grad=True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=settings.lr)
    labels = torch.full((settings.batch_size,), target, device=x.device)
    precision = reduced_precision(classifier, x.device) if settings.bfloat16 else contextlib.nullcontext()
    with fast_eval(classifier), bypassed_identity_gates(classifier), frozen_parameters(classifier):
        for step in range(settings.steps):
            chosen = torch.randint(len(others), (settings.batch_size,), generator=generator, device=x.device)
            mask = torch.sigmoid(mask_logit)
            stamped = (1 - mask) * others[chosen] + mask * (low + (high - low) * torch.sigmoid(pattern_logit))
            with precision:
                outputs = classifier(stamped)
            # on the logits whatever the head (GatedClassifier.forward): probabilities would saturate
            if untargeted:
                attack = _own_label_margin(outputs.float(), other_labels[chosen])
            else:
                attack = classifier.loss(outputs.float(), labels)
            loss = attack + SIZE_WEIGHTS[settings.kind] * mask.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step(step)
        with torch.no_grad():
            mask = torch.sigmoid(mask_logit)
            pattern = low + (high - low) * torch.sigmoid(pattern_logit)
            trigger = Trigger(settings.kind, target, mask, pattern, 0.0, float(mask.sum()))
            if untargeted:
                trigger.success = 1.0 - hit_rate(classifier, trigger.stamp(others), other_labels)
            else:
                trigger.success = hit_rate(classifier, trigger.stamp(others), torch.full((len(others),), target))
    return trigger


def _own_label_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How far each input's own label leads the strongest other label, floored at zero (an input that
    has left its label pulls no further), averaged."""
    logits = logits.reshape(len(logits), -1)
    own = logits.gather(1, labels[:, None]).squeeze(1)
    rival = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return torch.relu(own - rival).mean()


def label_triggers(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TriggerSettings,
    on_label: Callable[[int, int], None] | None = None,
    labels: Sequence[int] | None = None,
) -> list[Trigger]:
    """A trigger for each of `labels` (default: every label the classifier outputs), in that order;
    `on_label(done, count)` after each one."""
    labels = list(range(output_count(classifier, x))) if labels is None else list(labels)
    triggers = []
    for label in labels:
        triggers.append(synthesise_trigger(classifier, x, y, label, settings))
        if on_label is not None:
            on_label(len(triggers), len(labels))
    return triggers


def output_count(classifier: GatedClassifier, x: torch.Tensor) -> int:
    """How many labels the classifier outputs."""
    classifier.eval()
    with torch.no_grad():
        return int(classifier(x[:1]).reshape(1, -1).shape[1])


def predicted_labels(classifier: GatedClassifier, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The classifier's label for each of `inputs`, run in batches."""
    with torch.no_grad():
        return torch.cat(
            [classifier(inputs[start : start + batch_size]).argmax(1) for start in range(0, len(inputs), batch_size)]
        )


def hit_rate(classifier: GatedClassifier, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Share of `inputs` the classifier puts on their label."""
    predicted = predicted_labels(classifier, inputs, batch_size)
    return int((predicted == labels.to(predicted.device)).sum()) / len(inputs)


def value_range(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel minimum and maximum of clean images; over all values for other inputs (a feature
    that is constant on clean data, such as a border pixel, must still be free to carry a trigger)."""
    if axis is None:
        return x.min(), x.max()
    dims = [dim for dim in range(x.ndim) if dim != axis]
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def as_numpy(trigger: Trigger) -> dict[str, np.ndarray]:
    return {"mask": trigger.mask.cpu().numpy()[0], "pattern": trigger.pattern.cpu().numpy()[0]}
