"""Masks unlearned against synthetic triggers: which neurons a trigger's path runs through.

    min_m  CE(f_m(x), y) + mean_t CE(f_m(t(x')), y') + keep * mean(1 - m),   m in [0, 1]

`x, y` are the clean samples, `t(x')` the clean samples of other labels than trigger `t`'s target
stamped with it, still labelled with their own label `y'`. Shutting a neuron the trigger's path runs
through lowers the second term; the first keeps the neurons clean accuracy needs, the last keeps
every other mask near 1. Unlike ANP's neuron perturbation, the loss names the path to cut (the
trigger's), so the masks do not collapse onto the layers that feed the head (docs/METHOD.md). The
model stays in eval mode (running BatchNorm statistics): a mask of 0 is then exactly the pruned
channel that the rewriter writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from anp_onnx.bridge.fast_eval import fast_eval, reduced_precision
from anp_onnx.bridge.importer import GatedClassifier, frozen_parameters
from anp_onnx.methods.perturbation import step_masks
from anp_onnx.methods.trigger.synthesis import Trigger


@dataclass(frozen=True)
class UnlearningSettings:
    steps: int = 300
    batch_size: int = 128
    lr: float = 0.05  # Adam on the masks
    keep_weight: float = 1.0  # weight of mean(1 - m)
    seed: int = 0


def unlearning_ranking(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    triggers: list[Trigger],
    settings: UnlearningSettings | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[tuple[int, int]]:
    """Every neuron as (gate index, channel), smallest unlearned mask first; the masks end at 1 again."""
    settings = settings or UnlearningSettings()
    generator = torch.Generator(device=x.device).manual_seed(settings.seed)
    masks = [gate.mask for gate in classifier.gates]
    stamped_sets = [(x[y != trigger.target], y[y != trigger.target], trigger) for trigger in triggers]
    optimizer = torch.optim.Adam(masks, lr=settings.lr)
    precision = reduced_precision(classifier, x.device)
    try:
        with fast_eval(classifier), frozen_parameters(classifier.graph_module):  # the masks (the gates') stay trainable
            for step in range(settings.steps):
                loss = classifier.loss(*_forward(classifier, x, y, settings.batch_size, generator, precision))
                for others, labels, trigger in stamped_sets:
                    outputs, chosen = _forward(
                        classifier, others, labels, settings.batch_size, generator, precision, trigger
                    )
                    loss = loss + classifier.loss(outputs, chosen) / len(stamped_sets)
                loss = loss + settings.keep_weight * torch.cat([1 - mask for mask in masks]).mean()
                optimizer.zero_grad(set_to_none=True)
                step_masks(optimizer, loss, masks)
                if on_step is not None:
                    on_step(step)
        values = [
            (value, index, channel)
            for index, mask in enumerate(masks)
            for channel, value in enumerate(mask.detach().tolist())
        ]
    finally:
        with torch.no_grad():
            for mask in masks:
                mask.fill_(1.0)
    values.sort(key=lambda item: item[0])
    return [(index, channel) for _, index, channel in values]


def _forward(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    precision: contextlib.AbstractContextManager,
    trigger: Trigger | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's outputs (float32, computed inside `precision`) on a batch drawn with
    replacement (stamped with `trigger`), and its labels."""
    index = torch.randint(len(x), (batch_size,), generator=generator, device=x.device)
    inputs = x[index] if trigger is None else trigger.stamp(x[index])
    with precision:
        outputs = classifier(inputs)
    return outputs.float(), y[index]
