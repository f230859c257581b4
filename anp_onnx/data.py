"""Labelled samples from `.npz` files, laid out as the model's input expects.

Format: `x` and `y`. `x` float32 already in the model's input layout is used as is; `uint8` images
`(N,H,W)` or `(N,H,W,C)` are scaled to [0,1] and laid out for the model (NCHW, NHWC or flattened in
C,H,W order for rank-2 inputs). `y` holds integer labels.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anp_onnx.errors import AnpError


@dataclass(frozen=True)
class Samples:
    """Inputs in the model's layout (float32) and their integer labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def input_layout(shape: tuple[int | None, ...]) -> str:
    """'NCHW', 'NHWC', or 'flat'/'other' for the model's input shape."""
    if len(shape) == 4:
        channels_first, channels_last = shape[1], shape[3]
        if channels_last in (1, 3, 4) and channels_first not in (1, 3, 4):
            return "NHWC"
        return "NCHW"
    return "flat" if len(shape) == 2 else "other"


def load_samples(path: str | Path, shape: tuple[int | None, ...], what: str = "data") -> Samples:
    """Read `x`/`y` from an .npz and lay `x` out for an input of `shape` (None = any size)."""
    path = Path(path)
    if not path.is_file():
        raise AnpError(f"{what} {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise AnpError(f"{what} {path}: needs arrays 'x' and 'y', found {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as error:
        raise AnpError(f"{what} {path}: not a readable .npz file ({error})") from None
    if len(x) == 0:
        raise AnpError(f"{what} {path}: no samples")
    if y.ndim != 1 or len(y) != len(x):
        raise AnpError(f"{what} {path}: 'y' must be {len(x)} labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise AnpError(f"{what} {path}: labels 'y' must be integers, got {y.dtype}")
    laid_out = to_model_layout(x, shape, f"{what} {path}")
    if not np.isfinite(laid_out).all():
        raise AnpError(f"{what} {path}: 'x' contains NaN or Inf (or values beyond float32)")
    return Samples(np.ascontiguousarray(laid_out), y.astype(np.int64))


def to_model_layout(x: np.ndarray, shape: tuple[int | None, ...], source: str) -> np.ndarray:
    """uint8 images -> float32 in [0,1] in the model's layout; float inputs must already fit."""
    if x.dtype == np.uint8:
        x = _images_to_layout(x.astype(np.float32) / 255.0, shape, source)
    elif np.issubdtype(x.dtype, np.floating):
        with np.errstate(over="ignore"):  # values beyond float32 become Inf, refused by the caller
            x = x.astype(np.float32)
    else:
        raise AnpError(f"{source}: 'x' must be uint8 images or float32 inputs, got {x.dtype}")
    if not _fits(x.shape, shape):
        raise AnpError(f"{source}: samples of shape {x.shape[1:]} do not fit the model input {_show(shape)}")
    return x


def _images_to_layout(images: np.ndarray, shape: tuple[int | None, ...], source: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if images.ndim != 4:
        raise AnpError(f"{source}: uint8 images must be (N,H,W) or (N,H,W,C), got {images.shape}")
    layout = input_layout(shape)
    if layout == "NHWC":
        return images
    chw = images.transpose(0, 3, 1, 2)
    if layout == "flat":
        return chw.reshape(len(chw), -1)
    if layout == "other" and len(shape) == 3:
        return chw[:, 0] if chw.shape[1] == 1 else chw
    return chw


def _fits(actual: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    if len(actual) != len(expected):
        return False
    return all(want is None or want == have for have, want in zip(actual[1:], expected[1:], strict=True))


def _show(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if dim is None else str(dim) for dim in shape) + ")"
