"""A 100-label image set built from a 10-class one: two images side by side, labelled ``10 * a + b``.

No 100-class image set can be downloaded on the machines this project runs on, yet a defence must be
tried on models with many labels (a per-label trigger search costs ten times more there, issue 23).
Pairs of Fashion-MNIST images give one: the left image's class ``a`` is the tens digit, the right
image's class ``b`` the units digit. The images keep the layout ``tools/datasets.py`` returns, uint8
(N, H, W), so a pair is (N, 28, 56); labels are int64. Numpy only, like ``tools/datasets.py``.

Three images in a row (``row_images(..., width=3)``, (N, 28, 84)) give 1,000 labels the same way: the
left image's class is the hundreds digit.
"""

from __future__ import annotations

import numpy as np

BASE_CLASSES = 10  # classes of the single-image set (Fashion-MNIST)
PAIR_CLASSES = BASE_CLASSES * BASE_CLASSES


def balanced_labels(count: int, rng: np.random.Generator, classes: int = PAIR_CLASSES) -> np.ndarray:
    """``count`` labels in random order, each of the ``classes`` labels ``count // classes`` or one more times."""
    labels = np.resize(np.arange(classes, dtype=np.int64), count)
    return rng.permutation(labels)


def draw_images_of_classes(y: np.ndarray, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each entry of ``classes``, the index of a random image of ``y`` with that class (with replacement)."""
    picked = np.empty(len(classes), dtype=np.int64)
    for cls in np.unique(classes):
        pool = np.flatnonzero(y == cls)
        if len(pool) == 0:
            raise ValueError(f"no image of class {cls} to build pairs from")
        wanted = np.flatnonzero(classes == cls)
        picked[wanted] = rng.choice(pool, size=len(wanted))
    return picked


def pair_images(x: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pair images (N, H, 2W) of ``x``'s dtype and their labels ``10 a + b`` (int64).

    The label is drawn first (balanced over all 100), then one image of class ``a`` for the left half
    and one of class ``b`` for the right, so every label is about equally frequent whatever the class
    sizes of ``x``. Images are drawn with replacement: one image can appear in several pairs.
    """
    return row_images(x, y, count, rng, width=2)


def row_images(
    x: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rows of ``width`` images (N, H, width * W) and their labels: the images' classes read as the
    digits of a ``width``-digit number, the left image's the most significant; built as ``pair_images``."""
    if x.ndim != 3 or len(x) != len(y):
        raise ValueError(f"expected images (N, H, W) with N labels, got {x.shape} and {y.shape}")
    labels = balanced_labels(count, rng, BASE_CLASSES**width)
    digits = [(labels // BASE_CLASSES ** (width - 1 - place)) % BASE_CLASSES for place in range(width)]
    return np.concatenate([x[draw_images_of_classes(y, digit, rng)] for digit in digits], axis=2), labels
