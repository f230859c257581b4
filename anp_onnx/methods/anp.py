"""Adversarial Neuron Pruning's mask optimisation (Wu & Wang, NeurIPS 2021), as the reference code runs it.

    min_m  alpha * L(m) + (1 - alpha) * max_{delta, xi} L(m + delta, 1 + xi)

Each iteration: noise drawn from U(-eps, eps), one signed-gradient ascent step of size eps on the
clean loss, then one SGD(momentum) step on the masks, clamped to [0, 1]. BatchNorm layers use batch
statistics meanwhile (train mode); layers without BatchNorm get the same through their gate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from anp_onnx.bridge.gates import ChannelStatistics
from anp_onnx.bridge.importer import GatedClassifier
from anp_onnx.prune import MaskValues

NEURON_MODES = ("batchnorm", "bias")
METHODS = ("trigger", "anp")  # see purify.py: trigger-guided pruning (default) or the paper's mask pruning


@dataclass(frozen=True)
class AnpSettings:
    """Defaults from the paper and its reference code. `method` picks what decides the pruning:
    "anp", the paper's optimised masks, or "trigger" (the default), `guided.py`."""

    method: str = "trigger"
    iterations: int = 2000
    batch_size: int = 128
    eps: float = 0.4
    alpha: float = 0.2
    mask_lr: float = 0.2
    momentum: float = 0.9
    augment: bool = True
    average_masks: bool = False  # rank by the masks' mean over the run after a burn-in (docs/METHOD.md)
    burn_in: float = 0.1  # share of `iterations` before the average starts
    neuron_mode: str = "batchnorm"  # layers without BatchNorm: "batchnorm" re-creates it, "bias" is plain
    seed: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def calibrate(classifier: GatedClassifier, x: torch.Tensor, settings: AnpSettings, batch_size: int = 256) -> None:
    """Measure each channel's clean mean and std (eval mode) and set the pruned values.

    In "batchnorm" mode a layer without BatchNorm is normalised with batch statistics while masks
    are optimised, towards its clean mean/std, and a pruned channel outputs its clean mean (what a
    pruned BatchNorm channel outputs, its beta). Layers with no per-channel bias keep their bias.
    """
    statistics = [ChannelStatistics(gate.channel_axis) for gate in classifier.gates]
    classifier.eval()
    classifier.observe_gate_inputs(x, lambda index, activation: statistics[index].add(activation), batch_size)
    for layer, gate, stats in zip(classifier.neuron_map.layers, classifier.gates, statistics, strict=True):
        mean, std = stats.mean_std()
        gate.reference_mean.copy_(torch.from_numpy(mean).float())
        gate.reference_std.copy_(torch.from_numpy(std).float())
        gate.renormalise = gate.renormalise and settings.neuron_mode == "batchnorm"
        if gate.renormalise and layer.bias_per_channel:
            gate.pruned_value.copy_(gate.reference_mean)


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


def step_masks(optimizer: torch.optim.Optimizer, loss: torch.Tensor, masks: list[torch.Tensor]) -> None:
    """One optimiser step on the masks only (the caller zeroed their gradients), clamped to [0, 1]."""
    loss.backward(inputs=masks)
    optimizer.step()
    with torch.no_grad():
        for mask in masks:
            mask.clamp_(0.0, 1.0)


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


def noise_parameters(classifier: GatedClassifier) -> list[torch.nn.Parameter]:
    return [noise for gate in classifier.gates for noise in (gate.noise_weight, gate.noise_bias)]


def adversarial_noise(
    classifier: GatedClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    noises: list[torch.nn.Parameter],
    eps: float,
    generator: torch.Generator,
) -> None:
    """Random start in [-eps, eps], then one step of size eps along the sign of the loss gradient.
    Not clipped afterwards, as in the reference code (the noise can reach 2*eps)."""
    with torch.no_grad():
        for noise in noises:
            noise.copy_(torch.rand(noise.shape, generator=generator, device=noise.device) * 2 * eps - eps)
    set_perturbed(classifier.gates, True)
    loss = classifier.loss(classifier(images), labels)
    gradients = torch.autograd.grad(loss, noises)
    with torch.no_grad():
        for noise, gradient in zip(noises, gradients, strict=True):
            noise.add_(eps * torch.sign(gradient))


def set_perturbed(gates, perturbed: bool) -> None:
    for gate in gates:
        gate.perturbed = perturbed


@contextmanager
def optimisation_mode(classifier: GatedClassifier) -> Iterator[None]:
    """BatchNorm (kept or re-created by the gates) on batch statistics, the rest in eval mode."""
    classifier.eval()
    for module in classifier.batch_norm_modules():
        module.train()
        module.momentum = 0.0  # batch statistics, running statistics left as they are
    for gate in classifier.gates:
        gate.optimising = True
    try:
        yield
    finally:
        classifier.eval()
        for gate in classifier.gates:
            gate.optimising = False
            gate.perturbed = False


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


def tensors(values: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(values).to(device), torch.from_numpy(labels).to(device)
