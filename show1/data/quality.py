"""Content checks on sampled frames: perceptual hashes and static detection (near-duplicate search: dedupe)."""

from __future__ import annotations

import numpy as np

from show1.data.video import THUMB


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(THUMB)
_BITS = 1 << np.arange(64, dtype=np.uint64)


def phash(thumbnail: np.ndarray) -> int:
    """64-bit perceptual hash (pHash): signs of the 8×8 lowest DCT frequencies against their median."""
    if thumbnail.shape != (THUMB, THUMB):
        raise ValueError(f"phash needs a {THUMB}x{THUMB} gray image, got {thumbnail.shape}")
    coeffs = (_DCT @ thumbnail.astype(np.float64) @ _DCT.T)[:8, :8].ravel()
    bits = coeffs > np.median(coeffs[1:])
    return int(np.sum(_BITS[bits], dtype=np.uint64))


def mean_motion(thumbnails: np.ndarray) -> float:
    """Mean absolute difference of consecutive gray thumbnails, in 0–255 units."""
    if len(thumbnails) < 2:
        return 0.0
    diffs = np.abs(np.diff(thumbnails.astype(np.int16), axis=0))
    return float(diffs.mean())


def pick_evenly(count: int, wanted: int) -> np.ndarray:
    """Indices of up to `wanted` items spread evenly over `count`."""
    return np.unique(np.linspace(0, count - 1, num=min(count, wanted)).round().astype(int))
