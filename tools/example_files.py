"""The files of one example folder (examples/README.md): model.onnx and the clean, test and poison `.npz`
samples. Torch-free, so that trainers in other environments (tools/keras_softmax_model.py) write the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savez_compressed(path, x=np.ascontiguousarray(x, dtype=np.uint8), y=y.astype(np.int64))


def write_example(
    folder: Path,
    model_bytes: bytes,
    clean: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    poison_x: np.ndarray | None = None,
    target: int | None = None,
) -> None:
    """model.onnx, clean.npz and test.npz (images, labels), and poison.npz: the triggered images, every one
    labelled with the attacker's `target`. A model with no backdoor (tools/scale_models.py) passes no
    `poison_x` and gets no poison.npz, rather than an empty or made-up one."""
    if poison_x is not None and target is None:
        raise ValueError("poison images need the attacker's target label")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model_bytes)
    save_npz(folder / "clean.npz", *clean)
    save_npz(folder / "test.npz", *test)
    if poison_x is not None:
        save_npz(folder / "poison.npz", poison_x, np.full(len(poison_x), target, dtype=np.int64))
