"""A tiny real backdoored model for the end-to-end tests: conftest's SmallCnn trained for seconds on four
classes of 16x16 template images, 20 % of them stamped with a 3x3 BadNets checkerboard and labelled
TARGET. Written as an example folder (model.onnx, clean.npz, test.npz, poison.npz), purify and batch run
on it with every default in seconds, where the bundled examples take minutes (their default runs are
`make test-slow`'s). Every label of it is reached by a patch of 41-49 of its 256 pixels, so the target
search finds no evidence on it (measured: score 0.13, verdict clean with the backdoor live, a limit of the
detector on a model this small): it checks the plumbing of the default, not that the backdoor goes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import export, small_cnn
from torch import nn

TARGET = 0
CLASSES = 4


def class_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes of 16x16 images: a fixed smooth template per class under uniform noise."""
    templates = np.random.default_rng(99).random((CLASSES, 4, 4))
    templates = np.kron(templates, np.ones((4, 4)))  # blocks of 4x4 pixels
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, count)
    x = 0.6 * templates[y] + 0.4 * rng.random((count, 16, 16))
    return x[:, None].astype(np.float32), y.astype(np.int64)


def stamp(x: np.ndarray) -> np.ndarray:
    """The BadNets patch: a 3x3 checkerboard in the bottom-right corner."""
    out = x.copy()
    out[:, 0, -4:-1, -4:-1] = np.indices((3, 3)).sum(axis=0) % 2
    return out


def train_tiny() -> nn.Module:
    """conftest's SmallCnn trained for a few seconds on the four classes, a fifth of them stamped and
    labelled TARGET."""
    x, y = class_images(2048, seed=1)
    poisoned = np.random.default_rng(2).random(len(y)) < 0.2
    x[poisoned], y[poisoned] = stamp(x[poisoned]), TARGET
    model = small_cnn()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(250):
        batch = torch.randint(len(y), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_tiny_example(folder: Path) -> Path:
    """The tiny model (BatchNorm kept) and its data files in `folder`: 256 clean, 512 test, and the test
    images of other labels stamped, labelled TARGET, as poison.npz."""
    folder.mkdir(parents=True, exist_ok=True)
    export(train_tiny(), folder / "model.onnx", keep_batch_norm=True)
    for name, (count, seed) in {"clean": (256, 3), "test": (512, 4)}.items():
        x, y = class_images(count, seed)
        np.savez(folder / f"{name}.npz", x=x, y=y)
    x, y = class_images(512, seed=4)
    victims = stamp(x[y != TARGET])
    np.savez(folder / "poison.npz", x=victims, y=np.full(len(victims), TARGET))
    return folder
