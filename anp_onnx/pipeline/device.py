"""Where torch runs: the `--device` choice resolved against what this machine has."""

from __future__ import annotations

import torch

from anp_onnx.errors import AnpError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """auto -> CUDA when torch sees a GPU, else CPU; an explicit choice must be available."""
    if device not in DEVICES:
        raise AnpError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise AnpError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
