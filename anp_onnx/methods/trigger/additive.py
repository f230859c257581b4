"""A universal additive trigger: one small perturbation added to every clean input (after universal
adversarial perturbations, Moosavi-Dezfooli et al. CVPR 2017, and i-BAU's inner max), for one label.

    stamped = clip(x + d, low, high),   |d| <= bound x (high - low) per channel,   min CE(f(stamped), target)

Signed-gradient steps from zero. A patch or a blend models a trigger that replaces pixels; a signal added
over the whole image (SIG's sinusoid, Barni et al. 2019, a clean-label attack) is reached by neither with a
small mask, but it leaves the target label reachable by a faint additive pattern that reaches other labels
far less often (docs/METHOD.md): its success at a small bound, against a typical label's, is evidence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from anp_onnx.bridge.fast_eval import bypassed_identity_gates, fast_eval, reduced_precision
from anp_onnx.bridge.importer import GatedClassifier, frozen_parameters
from anp_onnx.methods.trigger.synthesis import Trigger, channel_axis_of, hit_rate, value_range

KIND = "additive"
DEFAULT_BOUND = 0.05  # share of each channel's clean value range
DEFAULT_STEPS = 60
STEP_SHARE = 0.1  # each signed step moves this share of the bound


@dataclass
class AdditiveTrigger(Trigger):
    """`pattern` is the perturbation `d`, `mask` all ones, `size` the bound (a share of the value range);
    `low`, `high`: the clean data's per-channel range the stamp is clipped to."""

    low: torch.Tensor
    high: torch.Tensor

    def stamp(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(inputs + self.pattern, self.low), self.high)


def synthesise_additive(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    target: int,
    *,
    bound: float = DEFAULT_BOUND,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> AdditiveTrigger:
    """The perturbation within `bound` that sends clean inputs of other labels to `target`; `success`
    is the share of all of them it sends there."""
    low, high = value_range(x, channel_axis_of(x))
    start = AdditiveTrigger(KIND, target, torch.ones_like(x[:1]), torch.zeros_like(x[:1]), 0.0, bound, low, high)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    precision = reduced_precision(classifier, x.device)
    with fast_eval(classifier), bypassed_identity_gates(classifier), frozen_parameters(classifier):
        return refine_additive(classifier, x[y != target], start, steps, generator, batch_size, on_step, precision)


def refine_additive(
    classifier: GatedClassifier,
    others: torch.Tensor,
    trigger: AdditiveTrigger,
    steps: int,
    generator: torch.Generator,
    batch_size: int = 128,
    on_step: Callable[[int], None] | None = None,
    precision: contextlib.AbstractContextManager | None = None,
) -> AdditiveTrigger:
    """`trigger` after `steps` more signed-gradient steps on `others` (inputs of other labels), its bound
    kept; a new trigger, its success measured on all of `others`. The classifier as it is (eval mode);
    the model computes inside `precision` (none by default)."""
    limit = trigger.size * (trigger.high - trigger.low)
    perturbation = trigger.pattern.detach().clone()
    labels = torch.full((batch_size,), trigger.target, device=others.device)
    precision = precision or contextlib.nullcontext()
    for step in range(steps):
        chosen = torch.randint(len(others), (batch_size,), generator=generator, device=others.device)
        perturbation.requires_grad_(True)
        stamped = torch.minimum(torch.maximum(others[chosen] + perturbation, trigger.low), trigger.high)
        with precision:
            outputs = classifier(stamped)
        (gradient,) = torch.autograd.grad(classifier.loss(outputs.float(), labels), perturbation)
        with torch.no_grad():
            perturbation = torch.minimum(
                torch.maximum(perturbation - STEP_SHARE * limit * gradient.sign(), -limit), limit
            )
        if on_step is not None:
            on_step(step)
    refined = AdditiveTrigger(
        KIND, trigger.target, trigger.mask, perturbation.detach(), 0.0, trigger.size, trigger.low, trigger.high
    )
    with torch.no_grad():
        refined.success = hit_rate(classifier, refined.stamp(others), torch.full((len(others),), trigger.target))
    return refined
