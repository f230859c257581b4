"""Readers for the image datasets used with anp-onnx, returning plain numpy arrays.

Nothing here imports torch: the loaders only turn files on disk into ``uint8`` images
and ``int64`` labels. Fashion-MNIST is read from IDX files (the Debian package
``dataset-fashion-mnist`` installs them), CIFAR-10 from a local copy in either of its
two official formats. The CIFAR "python version" is a pickle; it is read with a
restricted unpickler that can only rebuild numpy arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import gzip
import importlib
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

Split = Literal["train", "test"]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzipped(path: Path) -> bytes:
    """Return the file's bytes, gunzipped when it starts with the gzip magic number."""
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an uncompressed IDX buffer into an array in native byte order."""
    if len(data) < 4:
        raise ValueError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source}: bad IDX magic number {data[:4].hex()} (must start with 0000)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{source}: unknown IDX dtype code 0x{type_code:02x}")
    if ndim == 0:
        raise ValueError(f"{source}: IDX file declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} < {header_len} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        kind = "truncated" if payload < expected else "has trailing bytes"
        raise ValueError(
            f"{source}: IDX payload {kind}: {payload} bytes for shape {shape} of {dtype.name} (expected {expected})"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or plain) after checking its magic number, dtype and size."""
    path = Path(path)
    return parse_idx(_read_maybe_gzipped(path), source=str(path))


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def load_fashion_mnist(split: Split = "train", root: str | Path = FASHION_MNIST_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST as ``x`` uint8 (N, 28, 28) and ``y`` int64 (N,)."""
    _check_split(split)
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = []
    for name in names:
        candidates = [root / f"{name}.gz", root / name]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {name}[.gz] not found in {root}; "
                "install it with `apt-get install dataset-fashion-mnist` or pass another root"
            )
        paths.append(found)
    x = read_idx(paths[0])
    y = read_idx(paths[1])
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ValueError(f"{paths[0]}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{paths[1]}: {y.shape} labels do not match {len(x)} images")
    return x, y.astype(np.int64)


# --------------------------------------------------------------------------- CIFAR-10

CIFAR_PY_DIR = "cifar-10-batches-py"
CIFAR_BIN_DIR = "cifar-10-batches-bin"
_CIFAR_SIDE = 32
_CIFAR_PIXELS = 3 * _CIFAR_SIDE * _CIFAR_SIDE
_CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST_BATCHES = ["test_batch"]


def _numpy_reconstruct() -> Callable[..., Any]:
    """numpy's array-rebuild helper, from wherever this numpy version keeps it."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("cannot find numpy's multiarray._reconstruct")


def _latin1_bytes(text: str = "", encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` that only does what protocol-2 pickles of bytes need."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# (module, name) pairs a CIFAR batch pickle may reference -> what to hand back instead.
# Python 2 pickles say ``__builtin__``; Python 3 protocol-2 pickles encode bytes via
# ``_codecs.encode``, replaced here by a latin-1-only helper.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_bytes,
    **{
        (module, typ.__name__): (lambda t=typ: t)
        for module in ("builtins", "__builtin__")
        for typ in (bytes, dict, list)
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, dicts, lists and bytes.

    Dataset pickles come from users; a normal ``pickle.load`` would call any global
    the file names (``os.system`` ...). Here every global outside a short allow-list
    is refused before anything is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a dataset pickle")
        return factory()


def safe_unpickle(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (Python-2 strings become bytes)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _get(batch: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"CIFAR batch has no {key!r} entry (keys: {sorted(map(str, batch))})")


def read_cifar_python_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR-10 batch as ``x`` uint8 (N, 32, 32, 3) and ``y`` int64 (N,)."""
    path = Path(path)
    try:
        batch = safe_unpickle(path.read_bytes())
    except pickle.UnpicklingError:
        raise
    except Exception as exc:  # malformed pickles raise many different error types
        raise ValueError(f"{path}: not a readable CIFAR batch pickle ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = np.asarray(_get(batch, "data"))
    labels = np.asarray(_get(batch, "labels"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise ValueError(f"{path}: data must be uint8 (N, {_CIFAR_PIXELS}), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {labels.shape} labels do not match {len(data)} images")
    return _chw_rows_to_hwc(data), labels.astype(np.int64)


def read_cifar_binary_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch (records of 1 label byte + 3072 image bytes)."""
    path = Path(path)
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    record = 1 + _CIFAR_PIXELS
    if raw.size == 0 or raw.size % record:
        raise ValueError(f"{path}: size {raw.size} is not a whole number of {record}-byte CIFAR records")
    rows = raw.reshape(-1, record)
    return _chw_rows_to_hwc(rows[:, 1:]), rows[:, 0].astype(np.int64)


def _chw_rows_to_hwc(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) channel-major rows -> (N, 32, 32, 3) contiguous images."""
    images = rows.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images, dtype=np.uint8)


def _find_cifar_dir(root: Path, split: Split) -> tuple[Path, bool]:
    """Locate the batch folder under ``root``; returns (folder, is_python_format)."""
    first = (_CIFAR_TRAIN_BATCHES if split == "train" else _CIFAR_TEST_BATCHES)[0]
    for folder in (root / CIFAR_PY_DIR, root):
        if (folder / first).is_file():
            return folder, True
    for folder in (root / CIFAR_BIN_DIR, root):
        if (folder / f"{first}.bin").is_file():
            return folder, False
    raise FileNotFoundError(
        f"no CIFAR-10 {split} batches under {root}: expected {CIFAR_PY_DIR}/{first} or {CIFAR_BIN_DIR}/{first}.bin"
    )


def load_cifar10(root: str | Path, split: Split = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10 from a local copy as ``x`` uint8 (N, 32, 32, 3) and ``y`` int64 (N,).

    ``root`` may hold ``cifar-10-batches-py`` or ``cifar-10-batches-bin`` (the python
    format is preferred when both exist), or be one of those folders itself.
    """
    _check_split(split)
    folder, is_python = _find_cifar_dir(Path(root), split)
    names = _CIFAR_TRAIN_BATCHES if split == "train" else _CIFAR_TEST_BATCHES
    xs, ys = [], []
    for name in names:
        path = folder / (name if is_python else f"{name}.bin")
        if not path.is_file():
            raise FileNotFoundError(f"missing CIFAR-10 batch {path}")
        x, y = read_cifar_python_batch(path) if is_python else read_cifar_binary_batch(path)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)
