"""Adversarial neuron perturbation, shared by ANP's mask optimisation (`anp`), the target search
(`trigger.target`, `anp-onnx scan`) and trigger unlearning (`trigger.unlearning`): calibrating the gates
on clean data, the perturbation's inner step, the mode the classifier runs in meanwhile, and one clamped
optimiser step on the masks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from anp_onnx.bridge.gates import ChannelStatistics
from anp_onnx.bridge.importer import GatedClassifier
from anp_onnx.errors import AnpError
from anp_onnx.methods.settings import NEURON_MODES


def calibrate(
    classifier: GatedClassifier, x: torch.Tensor, *, neuron_mode: str = "batchnorm", batch_size: int = 256
) -> None:
    """Measure each channel's clean mean and std (eval mode) and set the pruned values.

    In "batchnorm" mode a layer without BatchNorm is normalised with batch statistics while masks
    are optimised, towards its clean mean/std, and a pruned channel outputs its clean mean (what a
    pruned BatchNorm channel outputs, its beta). Layers with no per-channel bias keep their bias.
    """
    if neuron_mode not in NEURON_MODES:
        raise AnpError(f"unknown neuron mode {neuron_mode!r}: use one of {', '.join(NEURON_MODES)}")
    statistics = [ChannelStatistics(gate.channel_axis) for gate in classifier.gates]
    classifier.eval()
    classifier.observe_gate_inputs(x, lambda index, activation: statistics[index].add(activation), batch_size)
    for layer, gate, stats in zip(classifier.neuron_map.layers, classifier.gates, statistics, strict=True):
        mean, std = stats.mean_std()
        gate.reference_mean.copy_(torch.from_numpy(mean).float())
        gate.reference_std.copy_(torch.from_numpy(std).float())
        gate.renormalise = gate.renormalise and neuron_mode == "batchnorm"
        if gate.renormalise and layer.bias_per_channel:
            gate.pruned_value.copy_(gate.reference_mean)


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


def step_masks(optimizer: torch.optim.Optimizer, loss: torch.Tensor, masks: list[torch.Tensor]) -> None:
    """One optimiser step on the masks only (the caller zeroed their gradients), clamped to [0, 1]."""
    loss.backward(inputs=masks)
    optimizer.step()
    with torch.no_grad():
        for mask in masks:
            mask.clamp_(0.0, 1.0)


def tensors(values: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(values).to(device), torch.from_numpy(labels).to(device)
