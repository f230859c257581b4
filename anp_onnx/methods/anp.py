"""Adversarial Neuron Pruning's mask optimisation (Wu & Wang, NeurIPS 2021), as the reference code runs it.

    min_m  alpha * L(m) + (1 - alpha) * max_{delta, xi} L(m + delta, 1 + xi)

Each iteration: noise drawn from U(-eps, eps), one signed-gradient ascent step of size eps on the
clean loss, then one SGD(momentum) step on the masks, clamped to [0, 1]. BatchNorm layers use batch
statistics meanwhile (train mode); layers without BatchNorm get the same through their gate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from anp_onnx import data
from anp_onnx.bridge.importer import GatedClassifier, hard_masks
from anp_onnx.data import Samples
from anp_onnx.methods.perturbation import (
    adversarial_noise,
    calibrate,
    noise_parameters,
    optimisation_mode,
    set_perturbed,
    step_masks,
    tensors,
)
from anp_onnx.methods.registry import Decision, MethodContext, Progress
from anp_onnx.methods.settings import NEURON_MODES, AnpMethodSettings, AnpSettings, PruningChoice
from anp_onnx.prune import MaskValues, PruningPlan

__all__ = ["NEURON_MODES", "AnpSettings", "decide", "mask_values", "optimise_masks"]


def decide(context: MethodContext, settings: AnpMethodSettings, progress: Progress | None = None) -> Decision:
    """`--method anp`: optimise the masks on the clean data (less what `max_acc_drop` holds out), then
    prune by the pruning choice; `progress` after each iteration."""
    torch.manual_seed(settings.seed)
    optimisation, pruning = settings.optimisation, settings.pruning
    optimise_on, held_out = split_holdout(context.clean, pruning, optimisation.seed)
    x, y = tensors(optimise_on.x, optimise_on.y, context.torch_device)
    classifier = context.classifier
    calibrate(classifier, x, neuron_mode=optimisation.neuron_mode)
    stop = StopWhenStable(pruning.settled) if settings.early_stop else None
    step = None
    if progress is not None:

        def step(iteration: int) -> None:
            progress(iteration + 1, optimisation.iterations)

    values = optimise_masks(classifier, x, y, optimisation, step, stop)
    accuracy_of = held_out_accuracy(classifier, held_out, context.torch_device) if held_out else None
    iterations_run = stop.stopped_at if stop and stop.stopped_at else optimisation.iterations
    return Decision(pruning.plan(values, accuracy_of), values, iterations_run=iterations_run)


def split_holdout(clean: Samples, pruning: PruningChoice, seed: int) -> tuple[Samples, Samples | None]:
    """Samples to optimise on and, when the pruning amount is chosen by accuracy, samples held out for that."""
    if pruning.max_acc_drop is None:
        return clean, None
    return data.split_holdout(clean, pruning.holdout, seed, "--holdout")


def held_out_accuracy(
    classifier: GatedClassifier, held_out: Samples, device: torch.device
) -> Callable[[PruningPlan], float]:
    """Accuracy of the classifier with a plan's hard masks on the held-out samples."""
    x, y = tensors(held_out.x, held_out.y, device)

    def accuracy_of(plan: PruningPlan) -> float:
        hard_masks(classifier, plan)
        classifier.eval()
        with torch.no_grad():
            return float((classifier(x).argmax(1) == y).float().mean())

    return accuracy_of


def optimise_masks(
    classifier: GatedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AnpSettings,
    on_iteration: Callable[[int], None] | None = None,
    stop: StopWhenStable | None = None,
) -> MaskValues:
    """Run the min-max loop and return the mask values; the classifier's own weights never change.
    `stop` ends the loop early once the pruning decision has settled."""
    generator = torch.Generator(device=x.device).manual_seed(settings.seed)
    for parameter in classifier.graph_module.parameters():
        parameter.requires_grad_(False)
    gates = list(classifier.gates)
    masks = [gate.mask for gate in gates]
    noises = noise_parameters(classifier)
    mask_optimizer = torch.optim.SGD(masks, lr=settings.mask_lr, momentum=settings.momentum)
    average = MaskAverage(masks, start=int(settings.burn_in * settings.iterations)) if settings.average_masks else None
    with optimisation_mode(classifier):
        for iteration in range(settings.iterations):
            images, labels = _batch(x, y, settings, generator)
            if settings.eps > 0:
                adversarial_noise(classifier, images, labels, noises, settings.eps, generator)
            mask_optimizer.zero_grad(set_to_none=True)
            set_perturbed(gates, False)
            natural = classifier.loss(classifier(images), labels)
            if settings.eps > 0:
                set_perturbed(gates, True)
                robust = classifier.loss(classifier(images), labels)
                loss = settings.alpha * natural + (1 - settings.alpha) * robust
            else:
                loss = natural
            step_masks(mask_optimizer, loss, masks)
            if average is not None:
                average.add(iteration)
            if on_iteration is not None:
                on_iteration(iteration)
            if stop is not None and stop(iteration, lambda: mask_values(classifier, average)):
                break
    return mask_values(classifier, average)


@dataclass
class StopWhenStable:
    """Early stop: every `every` iterations, ask `decide` which neurons it would prune from the
    masks as they stand; stop once that set has stayed the same for `patience` checks in a row
    (`patience * every` iterations). The paper reports good results from as few as 100 iterations."""

    decide: Callable[[MaskValues], frozenset[tuple[str, int]]]
    every: int = 100
    patience: int = 3
    stopped_at: int | None = None
    _history: list[frozenset[tuple[str, int]]] = field(default_factory=list)

    def __call__(self, iteration: int, current: Callable[[], MaskValues]) -> bool:
        if (iteration + 1) % self.every:
            return False
        self._history.append(self.decide(current()))
        recent = self._history[-(self.patience + 1) :]
        if len(recent) == self.patience + 1 and all(chosen == recent[0] for chosen in recent):
            self.stopped_at = iteration + 1
            return True
        return False


class MaskAverage:
    """Running mean of the masks from iteration `start` on. With the paper's learning rate the masks
    of a narrow net keep oscillating, so the last iterate is one noisy sample; the mean is stable."""

    def __init__(self, masks: list[torch.Tensor], start: int) -> None:
        self.masks, self.start, self.count = masks, start, 0
        self.sums = [torch.zeros_like(mask, dtype=torch.float64) for mask in masks]

    def add(self, iteration: int) -> None:
        if iteration < self.start:
            return
        with torch.no_grad():
            for total, mask in zip(self.sums, self.masks, strict=True):
                total.add_(mask.detach())
        self.count += 1

    def means(self) -> list[torch.Tensor] | None:
        return [total / self.count for total in self.sums] if self.count else None


def mask_values(classifier: GatedClassifier, average: MaskAverage | None = None) -> MaskValues:
    """The masks (their running mean when there is one) and pruned values, per layer."""
    pairs = list(zip(classifier.neuron_map.layers, classifier.gates, strict=True))
    means = average.means() if average is not None else None
    masks = means if means is not None else [gate.mask.detach() for gate in classifier.gates]
    return MaskValues(
        masks={layer.name: mask.float().cpu().numpy().copy() for (layer, _), mask in zip(pairs, masks, strict=True)},
        pruned_values={layer.name: gate.pruned_value.detach().cpu().double().numpy().copy() for layer, gate in pairs},
    )


def _batch(
    x: torch.Tensor, y: torch.Tensor, settings: AnpSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch drawn with replacement, with the paper's augmentation for image inputs."""
    index = torch.randint(len(x), (settings.batch_size,), generator=generator, device=x.device)
    images = x[index]
    if settings.augment and images.ndim == 4 and min(images.shape[2:]) >= 8:
        images = augment(images, generator)
    return images, y[index]


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding of 1/8 of the side (4 pixels at 32) and random horizontal flip."""
    count, _, height, width = images.shape
    pad = max(1, round(height / 8))
    padded = F.pad(images, (pad, pad, pad, pad))
    shift_y = torch.randint(0, 2 * pad + 1, (count,), generator=generator, device=images.device)
    shift_x = torch.randint(0, 2 * pad + 1, (count,), generator=generator, device=images.device)
    rows = (torch.arange(height, device=images.device) + shift_y[:, None])[:, None, :, None]
    cols = (torch.arange(width, device=images.device) + shift_x[:, None])[:, None, None, :]
    batch = torch.arange(count, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    cropped = padded[batch, channels, rows, cols]
    flip = torch.rand(count, generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)
