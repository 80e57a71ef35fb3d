"""Exact Hamming-radius search over 64-bit hashes: multi-index hashing (Norouzi, Punjani & Fleet, CVPR 2012).

Why this index: near-duplicate search asks for *every* stored hash within `radius` bits of a query (an exact
answer, so the result equals brute force and never depends on luck), at radii around 10 of 64 bits. A BK-tree
visits most of its nodes at that radius (it prunes only by the triangle inequality on one distance), and LSH
finds neighbours only with some probability. Multi-index hashing is exact and fast when the radius is a small
share of the bits:

- The 64 bits are cut into 4 substrings of 16 bits; each substring has a table (bucket offsets over its 65,536
  values, and the stored hashes sorted by that substring, so one bucket is one contiguous run of memory).
- Pigeonhole: if two hashes differ in at most r = 4q + a bits (0 <= a < 4), then one of the first a + 1
  substrings differs in at most q bits, or one of the others in at most q - 1. So probing substring b's table at
  every value within that radius of the query's substring finds every neighbour; each candidate is then checked
  on all 64 bits.
- A pair is reported from the first substring whose radius it satisfies only, so each pair comes out once.

At radius 10 that is 3 x 137 + 17 probes per query. The kernel is compiled with numba (the per-candidate work is
a popcount, far too fine-grained for numpy) and runs over all cores; it visits the queries sorted by the
substring it probes, so equal substrings read the same buckets from cache (10x faster than query order at 1 M).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import combinations

import numba
import numpy as np
from numba import njit, prange

# numba's own pool of threads, never the OpenMP runtime: torch shares that runtime in the same process, and numba's
# OpenMP layer sets its thread count for everyone (torch then ran on every core even with OMP_NUM_THREADS=1).
# That pool takes one parallel launch at a time: the lock keeps concurrent searches (threads of one process) apart.
numba.config.THREADING_LAYER = "workqueue"
_LAUNCH = threading.Lock()

BLOCKS = 4
BLOCK_BITS = 16
BUCKETS = 1 << BLOCK_BITS

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_U4 = np.uint64(4)
_U56 = np.uint64(56)
_LOW16 = np.uint64(0xFFFF)


@njit(inline="always")
def _popcount(x: np.uint64) -> np.int64:
    x = x - ((x >> _U1) & _M1)
    x = (x & _M2) + ((x >> _U2) & _M2)
    x = (x + (x >> _U4)) & _M4
    return np.int64((x * _H01) >> _U56)


@njit(inline="always")
def _block(x: np.uint64, block: int) -> np.int64:
    return np.int64((x >> np.uint64(block * BLOCK_BITS)) & _LOW16)


@njit(inline="always")
def _first_block(difference: np.uint64, radii: np.ndarray) -> np.int64:
    """The first substring whose radius the pair satisfies: the one table that reports the pair."""
    for block in range(BLOCKS):
        if _popcount((difference >> np.uint64(block * BLOCK_BITS)) & _LOW16) <= radii[block]:
            return block
    return BLOCKS


@njit(parallel=True, cache=True)
def _search_substring(block: int, order: np.ndarray, queries: np.ndarray, radius: np.int64, radii: np.ndarray,
                      masks: np.ndarray, offsets: np.ndarray, values: np.ndarray, members: np.ndarray,
                      counts: np.ndarray, slots: np.ndarray) -> None:
    """Probe substring `block`'s table for every query; append each pair this table reports to the query's slots
    (counts[q] keeps counting past the slots' width: those queries are searched again with wider slots).

    `order` visits the queries sorted by this substring's value: queries with equal values probe the same buckets
    one after another, so those buckets are read from cache, not memory (the difference is several times)."""
    width = slots.shape[1]
    for t in prange(order.shape[0]):
        q = order[t]
        query = queries[q]
        key = _block(query, block)
        found = counts[q]
        for m in range(masks.shape[0]):
            bucket = key ^ masks[m]
            for i in range(offsets[block, bucket], offsets[block, bucket + 1]):
                difference = query ^ values[block, i]
                if _popcount(difference) <= radius and _first_block(difference, radii) == block:
                    if found < width:
                        slots[q, found] = members[block, i]
                    found += 1
        counts[q] = found


def substring_radii(radius: int) -> np.ndarray:
    """Per substring, the radius to probe it at (-1: not probed) so that every pair within `radius` is found."""
    q, a = divmod(radius, BLOCKS)
    return np.array([q if block <= a else q - 1 for block in range(BLOCKS)], dtype=np.int64)


def _masks_within(bits: int, radius: int) -> np.ndarray:
    """Every `bits`-bit value with at most `radius` set bits, fewest bits first."""
    masks = [sum(1 << i for i in chosen)
             for r in range(min(radius, bits) + 1) for chosen in combinations(range(bits), r)]
    return np.array(masks, dtype=np.int64)


@dataclass(frozen=True)
class Matches:
    """Pairs (query position, stored position) within the radius, grouped by query, stored positions ascending."""

    queries: np.ndarray
    stored: np.ndarray


class HammingIndex:
    """Stored 64-bit hashes, searchable for every one within a Hamming radius of a query (exact)."""

    def __init__(self, hashes: np.ndarray) -> None:
        hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        if hashes.ndim != 1:
            raise ValueError(f"HammingIndex needs a 1-D array of uint64 hashes, got shape {hashes.shape}")
        self.size = len(hashes)
        self.offsets = np.zeros((BLOCKS, BUCKETS + 1), dtype=np.int64)
        self.members = np.empty((BLOCKS, self.size), dtype=np.int64)
        self.values = np.empty((BLOCKS, self.size), dtype=np.uint64)
        for block in range(BLOCKS):
            keys = ((hashes >> np.uint64(block * BLOCK_BITS)) & _LOW16).astype(np.int64)
            order = np.argsort(keys, kind="stable")
            self.members[block] = order
            self.values[block] = hashes[order]
            self.offsets[block, 1:] = np.cumsum(np.bincount(keys, minlength=BUCKETS))

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.members.nbytes + self.values.nbytes

    def search(self, queries: np.ndarray, radius: int) -> Matches:
        """Every (query, stored hash) pair at Hamming distance <= radius."""
        if not 0 <= radius <= 64:
            raise ValueError(f"a Hamming radius over 64-bit hashes is between 0 and 64, got {radius}")
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        radii = substring_radii(radius)
        counts, slots = self._probe(queries, radius, radii, width=8)
        wide = np.flatnonzero(counts > slots.shape[1])
        if len(wide):  # more matches than slots (rare): search those queries again with room for all of them
            wide_counts, wide_slots = self._probe(queries[wide], radius, radii, width=int(counts[wide].max()))
            counts[wide] = wide_counts
            kept = slots.shape[1]
            slots = np.concatenate([slots, np.full((len(queries), wide_slots.shape[1] - kept), -1)], axis=1)
            slots[wide] = wide_slots
        filled = np.arange(slots.shape[1])[None, :] < counts[:, None]
        stored = slots[filled]
        query_of = np.repeat(np.arange(len(queries), dtype=np.int64), counts)
        order = np.lexsort((stored, query_of))
        return Matches(queries=query_of[order], stored=stored[order])

    def _probe(self, queries: np.ndarray, radius: int, radii: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query: how many stored hashes lie within `radius`, and the first `width` of them (-1: none)."""
        counts = np.zeros(len(queries), dtype=np.int64)
        slots = np.full((len(queries), width), -1, dtype=np.int64)
        for block, block_radius in enumerate(radii):
            if block_radius < 0:
                continue
            keys = ((queries >> np.uint64(block * BLOCK_BITS)) & _LOW16).astype(np.int64)
            order = np.argsort(keys, kind="stable")
            masks = _masks_within(BLOCK_BITS, int(block_radius))
            with _LAUNCH:
                _search_substring(block, order, queries, np.int64(radius), radii, masks, self.offsets, self.values,
                                  self.members, counts, slots)
        return counts, slots
