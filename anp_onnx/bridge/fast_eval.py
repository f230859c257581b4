"""Eval-mode speed-ups that keep the classifier's function: the stages that only run the model in eval
mode (trigger synthesis, mask unlearning, the pruning rounds) spend most of their time in convolutions
and in the per-channel passes around them.

- `folded_batch_norm`: each BatchNorm that reads a Conv's output (and nothing else reads it) is folded
  into that Conv's weights for the block, the gate on the BatchNorm's output kept; in eval mode that is
  the same function, one pass over the activation fewer forward and backward.
- `channels_last`: 4-D weights in channels-last memory order for the block (oneDNN's preferred layout
  on CPU).
- `bypassed_identity_gates`: gates with every mask at 1 and no noise are skipped for the block.
- `reduced_precision`: bfloat16 autocast where the device computes it natively (CUDA with bfloat16,
  CPUs with AMX or AVX512-BF16) and it pays (not for grouped convolutions on a CPU), for trigger
  synthesis and unlearning; `ANP_ONNX_FULL_PRECISION=1` turns it off.

`fast_eval` puts the classifier in eval mode with the first two; docs/PERFORMANCE.md has what each gains.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from anp_onnx.bridge.importer import GatedClassifier

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FULL_PRECISION_VARIABLE = "ANP_ONNX_FULL_PRECISION"  # set (to anything but "" or "0"): no bfloat16 anywhere
CPU_BFLOAT16_CHECKS = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's feature probes


def bfloat16_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware, and reduced precision is not turned off."""
    if os.environ.get(FULL_PRECISION_VARIABLE, "") not in ("", "0"):
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)() for check in CPU_BFLOAT16_CHECKS)
    return False


def bfloat16_pays(classifier: GatedClassifier, device: torch.device) -> bool:
    """Whether the classifier runs faster in bfloat16 on `device`: where bfloat16 is native, except
    grouped (depthwise) convolutions on a CPU, which oneDNN computes about 2x slower in bfloat16 than
    in float32 (docs/PERFORMANCE.md)."""
    if not bfloat16_native(device):
        return False
    grouped = any(isinstance(module, CONVOLUTIONS) and module.groups > 1 for module in classifier.modules())
    return not (device.type == "cpu" and grouped)


def precision_name(classifier: GatedClassifier, device: torch.device) -> str:
    """What `reduced_precision` computes in: "bfloat16" or "float32"."""
    return "bfloat16" if bfloat16_pays(classifier, device) else "float32"


def reduced_precision(classifier: GatedClassifier, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on `device` where it pays (`bfloat16_pays`), nothing otherwise."""
    if bfloat16_pays(classifier, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def fast_eval(classifier: GatedClassifier) -> Iterator[None]:
    """The classifier in eval mode, with BatchNorm folded and channels-last weights inside the block."""
    classifier.eval()
    with folded_batch_norm(classifier), channels_last(classifier):
        yield


def foldable_pairs(graph_module: nn.Module) -> list[tuple[str, str]]:
    """(Conv, BatchNorm) submodule names where the BatchNorm reads only that Conv's output, the Conv's
    output goes nowhere else, and the Conv carries no gate of its own."""
    if not isinstance(graph_module, fx.GraphModule):
        return []
    pairs = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(graph_module.get_submodule(node.target), BATCH_NORMS):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        convolution = graph_module.get_submodule(source.target)
        batch_norm = graph_module.get_submodule(node.target)
        if isinstance(convolution, CONVOLUTIONS) and not convolution._forward_hooks and batch_norm.track_running_stats:
            pairs.append((source.target, node.target))
    return pairs


@contextlib.contextmanager
def folded_batch_norm(classifier: GatedClassifier) -> Iterator[None]:
    """Fold eval-mode BatchNorm into the Conv before it for the block (the classifier must be in eval
    mode); the BatchNorm's forward hooks (its gate) move to the identity that replaces it."""
    graph_module = classifier.graph_module
    if classifier.training or getattr(classifier, "_batch_norm_folded", False):
        yield
        return
    originals: dict[str, nn.Module] = {}
    try:
        for convolution_name, batch_norm_name in foldable_pairs(graph_module):
            convolution = graph_module.get_submodule(convolution_name)
            batch_norm = graph_module.get_submodule(batch_norm_name)
            originals[convolution_name], originals[batch_norm_name] = convolution, batch_norm
            fused = fuse_conv_bn_eval(convolution, batch_norm).requires_grad_(False)
            _replace(graph_module, convolution_name, fused)
            _replace(graph_module, batch_norm_name, _identity_with_hooks_of(batch_norm))
        classifier._batch_norm_folded = True
        yield
    finally:
        for name, module in originals.items():
            _replace(graph_module, name, module)
        classifier._batch_norm_folded = False


@contextlib.contextmanager
def channels_last(classifier: GatedClassifier) -> Iterator[None]:
    """4-D parameters in channels-last order inside the block, contiguous again after."""
    if not any(parameter.ndim == 4 for parameter in classifier.parameters()):
        yield
        return
    classifier.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        classifier.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def bypassed_identity_gates(classifier: GatedClassifier) -> Iterator[None]:
    """Skip, inside the block, the gates that are the identity as the block starts: every mask 1, no
    noise, no re-created BatchNorm. The masks must not change inside the block."""
    identity = [
        gate
        for gate in classifier.gates
        if not (gate.perturbed or gate.optimising or gate.bypassed) and bool((gate.mask == 1).all())
    ]
    for gate in identity:
        gate.bypassed = True
    try:
        yield
    finally:
        for gate in identity:
            gate.bypassed = False


def _identity_with_hooks_of(module: nn.Module) -> nn.Module:
    identity = nn.Identity()
    for hook in module._forward_hooks.values():
        identity.register_forward_hook(hook)
    return identity


def _replace(graph_module: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(graph_module.get_submodule(parent) if parent else graph_module, leaf, module)
