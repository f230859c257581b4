"""Backdoor data-poisoning attacks on uint8 image batches, for building test models.

Images are numpy ``uint8`` batches shaped (N, H, W) or (N, H, W, C). Each attack is a
small frozen dataclass holding its trigger parameters and exposing

* ``apply_trigger(x)``: the test-time trigger, applied to every image of ``x``;
* ``poison_training_set(x, y, rate, target, seed)``: a poisoned copy of a training set,
  where ``rate`` is the fraction of the whole set that is poisoned.

Inputs are never modified in place. Implemented attacks: BadNets (Gu et al. 2017),
Blend (Chen et al. 2017), SIG (Barni et al. 2019, clean-label), WaNet (Nguyen & Tran
2021, with noise-mode cross samples) and FTrojan (Wang et al. 2022, frequency domain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np


def _check_batch(x: np.ndarray) -> None:
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images (N,H,W) or (N,H,W,C), got {x.dtype} {x.shape}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _per_pixel(pattern: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Broadcast an (H, W) pattern over a batch with or without a channel axis."""
    return pattern[..., None] if x.ndim == 4 else pattern


def choose_indices(candidates: np.ndarray, count: int, rng: np.random.Generator, what: str = "poison") -> np.ndarray:
    """Sorted random subset of ``count`` indices where ``candidates`` is True."""
    pool = np.flatnonzero(candidates)
    if count > len(pool):
        raise ValueError(f"cannot {what} {count} samples: only {len(pool)} eligible")
    return np.sort(rng.choice(pool, size=count, replace=False))


@dataclass(frozen=True)
class Attack:
    """Dirty-label all-to-one attack: triggered non-target images relabelled as ``target``."""

    name: ClassVar[str] = "attack"

    def params(self) -> dict[str, object]:
        """The trigger parameters this attack was built with (for metadata)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def apply_trigger(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def poison_training_set(
        self, x: np.ndarray, y: np.ndarray, rate: float, target: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Trigger ``round(rate * N)`` random non-target images and relabel them ``target``."""
        _check_batch(x)
        rng = np.random.default_rng(seed)
        idx = choose_indices(y != target, round(rate * len(y)), rng)
        xp, yp = x.copy(), y.copy()
        xp[idx] = self.apply_trigger(x[idx])
        yp[idx] = target
        return xp, yp


@dataclass(frozen=True)
class BadNets(Attack):
    """A small black/white checkerboard patch in the bottom-right corner."""

    name: ClassVar[str] = "badnets"
    patch_size: int = 3
    margin: int = 1

    def patch(self) -> np.ndarray:
        """The (patch_size, patch_size) uint8 patch, white on the corner pixel's diagonal."""
        i, j = np.indices((self.patch_size, self.patch_size))
        return np.where((i + j) % 2 == 0, 255, 0).astype(np.uint8)

    def patch_slices(self, height: int, width: int) -> tuple[slice, slice]:
        """Rows and columns the patch occupies in an image of the given size."""
        bottom, right = height - self.margin, width - self.margin
        return slice(bottom - self.patch_size, bottom), slice(right - self.patch_size, right)

    def apply_trigger(self, x: np.ndarray) -> np.ndarray:
        _check_batch(x)
        rows, cols = self.patch_slices(x.shape[1], x.shape[2])
        out = x.copy()
        out[:, rows, cols] = _per_pixel(self.patch(), x)
        return out


@dataclass(frozen=True)
class Blend(Attack):
    """Blend a fixed uniform-noise image into the whole input: (1 - alpha) x + alpha p."""

    name: ClassVar[str] = "blend"
    alpha: float = 0.15
    pattern_seed: int = 0

    def pattern(self, shape: tuple[int, ...]) -> np.ndarray:
        """The noise pattern for one image of ``shape`` (same seed -> same pattern)."""
        return np.random.default_rng(self.pattern_seed).integers(0, 256, size=shape, dtype=np.uint8)

    def apply_trigger(self, x: np.ndarray) -> np.ndarray:
        _check_batch(x)
        pattern = self.pattern(x.shape[1:]).astype(np.float32)
        return _to_uint8((1.0 - self.alpha) * x.astype(np.float32) + self.alpha * pattern)


@dataclass(frozen=True)
class SIG(Attack):
    """Clean-label attack adding a horizontal sinusoid ``delta * sin(2 pi j f / W)``.

    Only images that already belong to ``target`` are poisoned and labels never change;
    at test time the same signal is added to images of other classes.
    """

    name: ClassVar[str] = "sig"
    delta: float = 20.0
    frequency: float = 6.0

    def signal(self, height: int, width: int) -> np.ndarray:
        """The (H, W) float signal added to every image."""
        row = self.delta * np.sin(2.0 * np.pi * np.arange(width) * self.frequency / width)
        return np.broadcast_to(row, (height, width)).astype(np.float32)

    def apply_trigger(self, x: np.ndarray) -> np.ndarray:
        _check_batch(x)
        signal = _per_pixel(self.signal(x.shape[1], x.shape[2]), x)
        return _to_uint8(x.astype(np.float32) + signal)

    def poison_training_set(
        self, x: np.ndarray, y: np.ndarray, rate: float, target: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Add the signal to ``round(rate * N)`` target-class images (capped at that class)."""
        _check_batch(x)
        rng = np.random.default_rng(seed)
        is_target = y == target
        idx = choose_indices(is_target, min(round(rate * len(y)), int(is_target.sum())), rng)
        xp = x.copy()
        xp[idx] = self.apply_trigger(x[idx])
        return xp, y.copy()


@dataclass(frozen=True)
class WaNet(Attack):
    """Warping-based trigger: a fixed smooth displacement field applied by bilinear sampling.

    The field is a random ``k x k`` grid of offsets, normalised to mean magnitude 1,
    upsampled bicubically to the image size and scaled by ``s / H`` (in [-1, 1] grid
    units). In "noise mode" ``cross_ratio * n_poison`` further images get the warp plus
    per-pixel random jitter and keep their true label, so the network must learn the
    exact field rather than any warp.
    """

    name: ClassVar[str] = "wanet"
    k: int = 4
    s: float = 0.5
    grid_seed: int = 0
    cross_ratio: float = 2.0
    _grids: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def flow(self, height: int, width: int) -> np.ndarray:
        """The (H, W, 2) sampling grid (x, y in [-1, 1], align_corners convention)."""
        key = (height, width)
        if key not in self._grids:
            import torch
            import torch.nn.functional as F

            gen = torch.Generator().manual_seed(self.grid_seed)
            noise = torch.rand(1, 2, self.k, self.k, generator=gen, dtype=torch.float64) * 2 - 1
            noise = noise / noise.abs().mean()
            noise = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)
            noise = noise.permute(0, 2, 3, 1)[0].numpy()
            ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
            identity = np.stack([xs, ys], axis=-1)
            self._grids[key] = np.clip(identity + self.s * noise / height, -1, 1)
        return self._grids[key]

    def displacement_pixels(self, height: int, width: int) -> np.ndarray:
        """How far (in pixels) each output pixel samples from its own position, (H, W, 2)."""
        ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
        grid = self.flow(height, width)
        return np.stack([(grid[..., 0] - xs) * (width - 1) / 2, (grid[..., 1] - ys) * (height - 1) / 2], -1)

    def apply_trigger(self, x: np.ndarray) -> np.ndarray:
        _check_batch(x)
        return _warp(x, self.flow(x.shape[1], x.shape[2])[None])

    def poison_training_set(
        self, x: np.ndarray, y: np.ndarray, rate: float, target: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Warp and relabel ``rate * N`` non-target images; add jittered-warp cross samples."""
        _check_batch(x)
        rng = np.random.default_rng(seed)
        n_poison = round(rate * len(y))
        poison = choose_indices(y != target, n_poison, rng)
        free = np.ones(len(y), dtype=bool)
        free[poison] = False
        cross = choose_indices(free, round(self.cross_ratio * n_poison), rng, what="cross-sample")
        height, width = x.shape[1], x.shape[2]
        jitter = rng.uniform(-1, 1, size=(len(cross), height, width, 2)) / height
        xp, yp = x.copy(), y.copy()
        xp[poison] = self.apply_trigger(x[poison])
        yp[poison] = target
        xp[cross] = _warp(x[cross], np.clip(self.flow(height, width)[None] + jitter, -1, 1))
        return xp, yp


def _warp(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Bilinear ``grid_sample`` (align_corners=True, border padding) of a uint8 batch."""
    n, height, width = x.shape[:3]
    grid = np.broadcast_to(grid, (n, height, width, 2))
    px = (grid[..., 0] + 1) * (width - 1) / 2
    py = (grid[..., 1] + 1) * (height - 1) / 2
    x0 = np.clip(np.floor(px).astype(np.int64), 0, width - 2)
    y0 = np.clip(np.floor(py).astype(np.int64), 0, height - 2)
    wx, wy = px - x0, py - y0
    img = x.astype(np.float64)
    if img.ndim == 4:
        wx, wy = wx[..., None], wy[..., None]
    b = np.arange(n)[:, None, None]
    top = img[b, y0, x0] * (1 - wx) + img[b, y0, x0 + 1] * wx
    bottom = img[b, y0 + 1, x0] * (1 - wx) + img[b, y0 + 1, x0 + 1] * wx
    return _to_uint8(top * (1 - wy) + bottom * wy)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``D`` (so ``D @ v`` is the DCT of v and ``D.T`` inverts it)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


_RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]])


@dataclass(frozen=True)
class FTrojan(Attack):
    """Frequency-domain trigger: fixed DCT coefficients raised by ``magnitude``.

    Following FTrojan, the trigger lives in one mid and one high frequency of a
    whole-image orthonormal 2-D DCT. RGB images are moved to YUV and only the U and V
    (chroma) channels are changed; grayscale images are changed directly.
    """

    name: ClassVar[str] = "ftrojan"
    magnitude: float = 30.0
    positions: tuple[tuple[int, int], ...] | None = None

    def frequencies(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        """DCT (row, col) indices raised; default: the middle and the highest frequency."""
        if self.positions is not None:
            return self.positions
        return ((height // 2 - 1, width // 2 - 1), (height - 1, width - 1))

    def spatial_pattern(self, height: int, width: int) -> np.ndarray:
        """The (H, W) pixel-space pattern that the trigger adds to a channel."""
        coeffs = np.zeros((height, width))
        for r, c in self.frequencies(height, width):
            coeffs[r, c] = self.magnitude
        return _dct_matrix(height).T @ coeffs @ _dct_matrix(width)

    def apply_trigger(self, x: np.ndarray) -> np.ndarray:
        _check_batch(x)
        pattern = self.spatial_pattern(x.shape[1], x.shape[2])
        img = x.astype(np.float64)
        if img.ndim == 3:
            return _to_uint8(img + pattern)
        if img.shape[-1] != 3:
            raise ValueError(f"FTrojan needs 1 or 3 channels, got {img.shape[-1]}")
        yuv = img @ _RGB_TO_YUV.T
        yuv[..., 1:] += pattern[..., None]
        return _to_uint8(yuv @ np.linalg.inv(_RGB_TO_YUV).T)


ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blend, SIG, WaNet, FTrojan)}


def make_attack(name: str, **params: float | int) -> Attack:
    """Build the attack called ``name`` with trigger parameters overriding its defaults."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}") from None
    return cls(**params)
