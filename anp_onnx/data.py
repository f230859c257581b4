"""Labelled samples from `.npz` files, laid out as the model's input expects.

Format: `x` and `y`. `x` float32 already in the model's input layout is used as is; `uint8` images
`(N,H,W)` or `(N,H,W,C)` are scaled to [0,1] and laid out for the model (NCHW, NHWC or flattened in
C,H,W order for rank-2 inputs). `y` holds integer labels.

The small clean set is read whole (`load_samples`); test and poison sets are streamed a batch at a
time (`open_samples`), so memory stays bounded however many samples they hold.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from anp_onnx.errors import AnpError

STREAM_ROWS = 1024  # samples read at a time from a streamed file
IMAGE_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: the channel counts that tell a channel axis from a side
_READ_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError)


@dataclass(frozen=True)
class Samples:
    """Inputs in the model's layout (float32) and their integer labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, rows: int = STREAM_ROWS) -> Iterator[Samples]:
        for start in range(0, len(self), rows):
            yield Samples(self.x[start : start + rows], self.y[start : start + rows])


def split_holdout(samples: Samples, share: float, seed: int, what: str = "holdout") -> tuple[Samples, Samples]:
    """(the rest, `share` of the samples held out), by a seeded permutation: the same seed holds out
    the same samples wherever a method judges its pruning on data it did not decide from. `what`
    names the setting in the error when a side would be empty."""
    count = round(len(samples) * share)
    if count < 1 or count >= len(samples):
        raise AnpError(f"{what} {share:g} leaves no samples on one side of {len(samples)}")
    order = np.random.default_rng(seed).permutation(len(samples))
    held, kept = order[:count], order[count:]
    return Samples(samples.x[kept], samples.y[kept]), Samples(samples.x[held], samples.y[held])


@dataclass(frozen=True)
class SampleFile:
    """Labelled samples in an .npz, read `rows` at a time; only the labels stay in memory. Checked
    whole when opened (`open_samples`), so reading it later cannot fail on the data."""

    path: Path
    shape: tuple[int | None, ...]
    what: str
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, rows: int = STREAM_ROWS) -> Iterator[Samples]:
        source = f"{self.what} {self.path}"
        start = 0
        for raw in _stream_x(self.path, rows, source):
            x = np.ascontiguousarray(to_model_layout(raw, self.shape, source))
            yield Samples(x, self.y[start : start + len(raw)])
            start += len(raw)


def open_samples(path: str | Path, shape: tuple[int | None, ...], what: str = "data") -> SampleFile:
    """Check an .npz as `load_samples` does, streaming through `x` instead of holding it."""
    path = Path(path)
    if not path.is_file():
        raise AnpError(f"{what} {path}: no such file")
    source = f"{what} {path}"
    try:
        with _npz_archive(path, source) as archive:
            if "x" not in archive or "y" not in archive:
                raise AnpError(f"{source}: needs arrays 'x' and 'y', found {sorted(archive.files)}")
            y = archive["y"]
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as member:
            length = _npy_header(member, source)[0][0]
    except (*_READ_ERRORS, zlib.error) as error:
        raise AnpError(f"{source}: not a readable .npz file ({error})") from None
    _check_labels(y, length, source)
    stream = SampleFile(path, shape, what, y.astype(np.int64))
    for batch in stream.batches():  # every value checked once, a batch at a time
        if not np.isfinite(batch.x).all():
            raise AnpError(f"{source}: 'x' contains NaN or Inf (or values beyond float32)")
    return stream


def _stream_x(path: Path, rows: int, source: str) -> Iterator[np.ndarray]:
    """`x` from the archive, `rows` samples at a time, without reading the rest."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as member:
            shape, fortran_order, dtype = _npy_header(member, source)
            if fortran_order:  # column-major rows are not contiguous on disk: read it whole
                with _npz_archive(path, source) as whole:
                    x = whole["x"]
                for start in range(0, len(x), rows):
                    yield x[start : start + rows]
                return
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], rows):
                count = min(rows, shape[0] - start)
                data = member.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise AnpError(f"{source}: 'x' is truncated")
                yield np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]))
    except (*_READ_ERRORS, zlib.error) as error:
        raise AnpError(f"{source}: not a readable .npz file ({error})") from None


def _npz_archive(path: Path, source: str) -> np.lib.npyio.NpzFile:
    """The .npz archive at `path`; AnpError for a file numpy reads as something else (a bare .npy array)."""
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise AnpError(f"{source}: a single .npy array, not an .npz archive with arrays 'x' and 'y'")
    return loaded


def _npy_header(member: BinaryIO, source: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(member)
    if dtype.hasobject:
        raise AnpError(f"{source}: 'x' holds Python objects; only numeric arrays are read")
    if len(shape) == 0 or shape[0] == 0:
        raise AnpError(f"{source}: no samples")
    return shape, fortran_order, dtype


def is_channels_last(shape: Sequence[int | None]) -> bool:
    """Whether a 4-D image batch shape is NHWC rather than NCHW: its last axis has an image's channel
    count and its second does not. The one layout guess the package makes (data, triggers, plots)."""
    return len(shape) == 4 and shape[3] in IMAGE_CHANNELS and shape[1] not in IMAGE_CHANNELS


def input_layout(shape: tuple[int | None, ...]) -> str:
    """'NCHW', 'NHWC', or 'flat'/'other' for the model's input shape."""
    if len(shape) == 4:
        return "NHWC" if is_channels_last(shape) else "NCHW"
    return "flat" if len(shape) == 2 else "other"


def load_samples(path: str | Path, shape: tuple[int | None, ...], what: str = "data") -> Samples:
    """Read `x`/`y` from an .npz and lay `x` out for an input of `shape` (None = any size)."""
    path = Path(path)
    if not path.is_file():
        raise AnpError(f"{what} {path}: no such file")
    try:
        with _npz_archive(path, f"{what} {path}") as archive:
            if "x" not in archive or "y" not in archive:
                raise AnpError(f"{what} {path}: needs arrays 'x' and 'y', found {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
    except (*_READ_ERRORS, zlib.error) as error:
        raise AnpError(f"{what} {path}: not a readable .npz file ({error})") from None
    if len(x) == 0:
        raise AnpError(f"{what} {path}: no samples")
    _check_labels(y, len(x), f"{what} {path}")
    laid_out = to_model_layout(x, shape, f"{what} {path}")
    if not np.isfinite(laid_out).all():
        raise AnpError(f"{what} {path}: 'x' contains NaN or Inf (or values beyond float32)")
    return Samples(np.ascontiguousarray(laid_out), y.astype(np.int64))


def _check_labels(y: np.ndarray, count: int, source: str) -> None:
    if y.ndim != 1 or len(y) != count:
        raise AnpError(f"{source}: 'y' must be {count} labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise AnpError(f"{source}: labels 'y' must be integers, got {y.dtype}")


def to_model_layout(x: np.ndarray, shape: tuple[int | None, ...], source: str) -> np.ndarray:
    """uint8 images -> float32 in [0,1] in the model's layout; float inputs must already fit."""
    if x.dtype == np.uint8:
        x = _images_to_layout(x.astype(np.float32) / 255.0, shape, source)
    elif np.issubdtype(x.dtype, np.floating):
        with np.errstate(over="ignore"):  # values beyond float32 become Inf, refused by the caller
            x = x.astype(np.float32, copy=False)
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
