"""The dataset readers return exactly what the files hold and refuse bad or hostile files."""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from tools.datasets import (
    FASHION_MNIST_ROOT,
    load_cifar10,
    load_fashion_mnist,
    read_cifar_python_batch,
    read_idx,
    safe_unpickle,
)

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialise ``arr`` in the IDX format (big-endian header and payload)."""
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[arr.dtype], arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gzipped: bool) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([[-70000, 1], [2, 1 << 30]], dtype=np.int32),
        np.array([0.5, -1.25, 3e7], dtype=np.float32),
    ],
    ids=["uint8", "int32", "float32"],
)
def test_read_idx_returns_the_array_that_was_written(tmp_path: Path, gzipped: bool, arr: np.ndarray) -> None:
    got = read_idx(write_idx(tmp_path / "a.idx", arr, gzipped))
    assert got.dtype == arr.dtype
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_read_idx_detects_gzip_by_content_not_by_name(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "labels-idx1-ubyte", labels, True)), labels)


def test_truncated_idx_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "short.idx"
    path.write_bytes(idx_bytes(np.zeros((4, 5, 5), np.uint8))[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_truncated_gzip_stream_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "short.idx.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((40, 28, 28), np.uint8)))[:-20])
    with pytest.raises(ValueError):
        read_idx(path)


def test_truncated_header_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "header.idx"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0, 2]))
    with pytest.raises(ValueError, match="header"):
        read_idx(path)


@pytest.mark.parametrize(
    ("header", "message"),
    [(bytes([1, 0, 0x08, 1]), "magic"), (bytes([0, 0, 0x42, 1]), "dtype code"), (bytes([0, 0, 0x08, 0]), "zero")],
)
def test_corrupt_idx_header_raises_value_error(tmp_path: Path, header: bytes, message: str) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(header + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match=message):
        read_idx(path)


def test_idx_with_trailing_bytes_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "long.idx"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"junk")
    with pytest.raises(ValueError, match="trailing"):
        read_idx(path)


# ----------------------------------------------------------------------- Fashion-MNIST


def test_load_fashion_mnist_reads_a_folder_of_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    y = np.array([0, 9, 2, 2, 5, 1], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x, True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y, False)
    got_x, got_y = load_fashion_mnist("test", root=tmp_path)
    assert got_x.dtype == np.uint8
    assert got_y.dtype == np.int64
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_unknown_split_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", root=tmp_path)  # type: ignore[arg-type]


@pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_test_split() -> None:
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28)
    assert x.dtype == np.uint8
    assert y.shape == (10000,)
    assert y.dtype == np.int64
    assert sorted(np.unique(y)) == list(range(10))
    assert np.bincount(y).tolist() == [1000] * 10


# ---------------------------------------------------------------------------- CIFAR-10


def cifar_rows(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Random CIFAR-like rows: uint8 (n, 3072) channel-major, and int labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, 10, size=n).tolist()


def as_hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def write_python_batch(path: Path, rows: np.ndarray, labels: list[int]) -> None:
    """Pickle a batch like the original files: protocol 2, bytes keys, a real numpy array."""
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": labels,
        b"data": rows,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def write_binary_batch(path: Path, rows: np.ndarray, labels: list[int]) -> None:
    path.write_bytes(np.concatenate([np.array(labels, np.uint8)[:, None], rows], axis=1).tobytes())


BATCHES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


@pytest.fixture()
def cifar_batches() -> dict[str, tuple[np.ndarray, list[int]]]:
    return {name: cifar_rows(3 + i, seed=i) for i, name in enumerate(BATCHES)}


@pytest.mark.parametrize("fmt", ["py", "bin"])
@pytest.mark.parametrize("point_at_batches_folder", [False, True])
def test_load_cifar10_returns_what_was_written(
    tmp_path: Path, cifar_batches: dict, fmt: str, point_at_batches_folder: bool
) -> None:
    folder = tmp_path / f"cifar-10-batches-{fmt}"
    folder.mkdir()
    for name, (rows, labels) in cifar_batches.items():
        if fmt == "py":
            write_python_batch(folder / name, rows, labels)
        else:
            write_binary_batch(folder / f"{name}.bin", rows, labels)
    root = folder if point_at_batches_folder else tmp_path

    x_train, y_train = load_cifar10(root, "train")
    x_test, y_test = load_cifar10(root, "test")

    train_rows = np.concatenate([cifar_batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([cifar_batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert x_train.shape == (len(train_rows), 32, 32, 3)
    assert x_train.dtype == np.uint8
    assert y_train.dtype == np.int64
    np.testing.assert_array_equal(x_train, as_hwc(train_rows))
    np.testing.assert_array_equal(y_train, train_labels)
    np.testing.assert_array_equal(x_test, as_hwc(cifar_batches["test_batch"][0]))
    np.testing.assert_array_equal(y_test, cifar_batches["test_batch"][1])


def test_cifar_pixel_layout_is_red_plane_first() -> None:
    rows = np.zeros((1, 3072), np.uint8)
    rows[0, :1024] = 10  # red plane
    rows[0, 1024:2048] = 20  # green plane
    rows[0, 2048:] = 30  # blue plane
    np.testing.assert_array_equal(as_hwc(rows)[0, 5, 7], [10, 20, 30])


def test_python_batch_pickled_by_old_numpy_loads(tmp_path: Path) -> None:
    rows, labels = cifar_rows(4, seed=1)
    path = tmp_path / "batch"
    write_python_batch(path, rows, labels)
    # The real CIFAR files name numpy.core.multiarray, not numpy 2's numpy._core.multiarray.
    path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    x, y = read_cifar_python_batch(path)
    np.testing.assert_array_equal(x, as_hwc(rows))
    np.testing.assert_array_equal(y, labels)


class RunsShellCommand:
    """Unpickling this object would run ``touch <marker>`` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    payload = pickle.dumps({b"data": RunsShellCommand(marker), b"labels": [0]}, protocol=2)
    assert b"system" in payload
    (folder / "test_batch").write_bytes(payload)

    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()


class Rot13:
    """Pickles as a call of ``_codecs.encode`` with a codec other than latin-1."""

    def __reduce__(self) -> tuple:
        return (codecs.encode, ("abc", "rot13"))


@pytest.mark.parametrize(
    "payload",
    [pickle.dumps(eval, protocol=2), pickle.dumps(getattr, protocol=2), pickle.dumps(Rot13(), protocol=2)],
    ids=["builtins.eval", "builtins.getattr", "codecs-other-than-latin1"],
)
def test_safe_unpickle_refuses_globals_outside_the_allow_list(payload: bytes) -> None:
    with pytest.raises(pickle.UnpicklingError):
        safe_unpickle(payload)


def test_safe_unpickle_rebuilds_numpy_arrays_and_bytes() -> None:
    original = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"name": b"\x00\xff", b"list": [1, 2]}
    restored = safe_unpickle(pickle.dumps(original, protocol=2))
    np.testing.assert_array_equal(restored[b"data"], original[b"data"])
    assert restored[b"name"] == b"\x00\xff"
    assert restored[b"list"] == [1, 2]


def test_binary_batch_with_partial_record_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rows, labels = cifar_rows(2, seed=0)
    write_binary_batch(folder / "test_batch.bin", rows, labels)
    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-1])
    with pytest.raises(ValueError, match="record"):
        load_cifar10(tmp_path, "test")


def test_missing_cifar_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches"):
        load_cifar10(tmp_path, "train")
