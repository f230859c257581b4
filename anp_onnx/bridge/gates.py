"""Neuron gates: the per-channel mask and adversarial noise that ANP puts on each layer's output.

A gate turns a layer's activation `y` into `(m + delta) * (y - p) + (1 + xi) * p`, where `p` is the
channel's pruned value (its bias, BatchNorm's beta, or the channel's clean mean). With `m = 0` the
channel outputs the constant `p`, which is exactly what `rewrite.py` writes into the ONNX file. In a
float16 model `p` is rounded to float16 on the way, as the rewriter must store it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from anp_onnx.onnx.neurons import Layer

NORMALISATION_EPS = 1e-5


class NeuronGate(nn.Module):
    """Mask and noise for one layer's channels."""

    def __init__(self, layer: Layer, pruned_value: np.ndarray, renormalise: bool) -> None:
        super().__init__()
        channels = layer.channels
        self.channel_axis = layer.channel_axis
        self.mask = nn.Parameter(torch.ones(channels))
        self.noise_weight = nn.Parameter(torch.zeros(channels))
        self.noise_bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("pruned_value", torch.as_tensor(pruned_value, dtype=torch.float32))
        self.register_buffer("reference_mean", torch.zeros(channels))
        self.register_buffer("reference_std", torch.ones(channels))
        self.stored_dtype = getattr(torch, layer.bias_dtype, torch.float32)  # precision `p` is written in
        self.renormalise = renormalise  # re-create train-mode BatchNorm for layers that have none
        self.optimising = False  # batch statistics on (only while masks are optimised)
        self.perturbed = False  # adversarial noise on
        self.bypassed = False  # the gate is known to be the identity (`fast_eval.bypassed_identity_gates`)

    def _per_channel(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[self.channel_axis] = -1
        return values.view(shape)

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        if self.bypassed:
            return activation
        ndim = activation.ndim
        if self.renormalise and self.optimising:
            axes = [axis for axis in range(ndim) if axis != self.channel_axis % ndim]
            variance, mean = torch.var_mean(activation, dim=axes, keepdim=True, correction=0)
            scale = self._per_channel(self.reference_std, ndim) * torch.rsqrt(variance + NORMALISATION_EPS)
            activation = (activation - mean) * scale + self._per_channel(self.reference_mean, ndim)
        scale, bias_factor = self.mask, 1.0
        if self.perturbed:
            scale = self.mask + self.noise_weight
            bias_factor = 1.0 + self.noise_bias
        stored_value = self.pruned_value
        if self.stored_dtype in (torch.float16, torch.bfloat16):
            stored_value = stored_value.to(self.stored_dtype).to(self.pruned_value.dtype)
        # scale * (y - p) + bias_factor * p in one fused pass over the activation; exact at both
        # ends: a mask of 1 without noise returns y, a mask of 0 returns bias_factor * p.
        offset = (bias_factor - scale) * stored_value
        return torch.addcmul(self._per_channel(offset, ndim), self._per_channel(scale, ndim), activation)


class ChannelStatistics:
    """Per-channel mean and standard deviation of an activation, accumulated over batches."""

    def __init__(self, channel_axis: int) -> None:
        self.channel_axis = channel_axis
        self.count = 0
        self.total: torch.Tensor | None = None
        self.total_squares: torch.Tensor | None = None

    def add(self, activation: torch.Tensor) -> None:
        values = activation.detach().double().movedim(self.channel_axis, -1)
        values = values.reshape(-1, values.shape[-1])
        sums, squares = values.sum(0), (values * values).sum(0)
        self.total = sums if self.total is None else self.total + sums
        self.total_squares = squares if self.total_squares is None else self.total_squares + squares
        self.count += values.shape[0]

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.total / self.count
        variance = (self.total_squares / self.count - mean * mean).clamp_min(0)
        return mean.cpu().numpy(), variance.sqrt().cpu().numpy()
