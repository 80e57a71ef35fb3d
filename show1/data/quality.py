"""Content checks on sampled frames: perceptual hashes, near-duplicate search, static detection."""

from __future__ import annotations

from dataclasses import dataclass, field

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


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two uint64 hash arrays: shape (len(a), len(b))."""
    xor = np.bitwise_xor(a[:, None], b[None, :])
    return np.unpackbits(xor.view(np.uint8).reshape(*xor.shape, 8), axis=-1).sum(axis=-1)


def mean_motion(thumbnails: np.ndarray) -> float:
    """Mean absolute difference of consecutive gray thumbnails, in 0–255 units."""
    if len(thumbnails) < 2:
        return 0.0
    diffs = np.abs(np.diff(thumbnails.astype(np.int16), axis=0))
    return float(diffs.mean())


def pick_evenly(count: int, wanted: int) -> np.ndarray:
    """Indices of up to `wanted` items spread evenly over `count`."""
    return np.unique(np.linspace(0, count - 1, num=min(count, wanted)).round().astype(int))


@dataclass
class _Kept:
    row: int
    label: str
    source_hash: str
    span: tuple[float, float]
    hashes: np.ndarray


@dataclass
class Deduplicator:
    """Remembers kept sources; tells whether a new one is a near-duplicate of any of them.

    Windows of the same file that do not overlap in time are intentional and never compared.
    """

    max_distance: int
    min_match: float
    kept: list[_Kept] = field(default_factory=list)

    def find(self, source_hash: str, span: tuple[float, float], hashes: np.ndarray) -> str | None:
        """A description of the kept source this one duplicates, or None."""
        for other in self.kept:
            if other.source_hash == source_hash:
                if span[0] < other.span[1] and other.span[0] < span[1]:
                    return (f"same file as row {other.row} ({other.label}) with an overlapping time span "
                            f"{span[0]:.2f}-{span[1]:.2f}s vs {other.span[0]:.2f}-{other.span[1]:.2f}s")
                continue
            distances = hamming(hashes, other.hashes).min(axis=1)
            share = float(np.mean(distances <= self.max_distance))
            if share >= self.min_match:
                return (f"near-duplicate of row {other.row} ({other.label}): {share:.0%} of sampled frames "
                        f"within Hamming distance {self.max_distance}")
        return None

    def add(self, row: int, label: str, source_hash: str, span: tuple[float, float],
            hashes: np.ndarray) -> None:
        self.kept.append(_Kept(row, label, source_hash, span, hashes))
