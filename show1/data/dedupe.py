"""Near-duplicate sources: which kept source, if any, each source repeats.

The rule (curate.filters): a frame of source A matches source B when its 64-bit pHash is within
`dedup_max_distance` bits of one of B's sampled frames; A duplicates B when the share of A's frames that match
reaches `dedup_min_match`. Windows of one file (equal content hash) are never compared by pHash: they duplicate
each other only when their time spans overlap.

Sources are decided in manifest order and a source duplicates only a source that was kept, so the first of a
group is kept, whatever order the chunks finished in. The pairs within the radius come from one exact
`HammingIndex` search over every sampled frame (not a comparison of every pair of sources), and the result is
the one a comparison of each source with every kept source before it gives (tested against that brute force).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from show1.data.hamming_index import HammingIndex


@dataclass(frozen=True)
class SourceFrames:
    """What dedupe needs of a source: who it is, which file and time span it came from, its frames' pHashes."""

    row: int
    label: str
    source_hash: str
    span: tuple[float, float]
    hashes: np.ndarray  # uint64, one per sampled frame


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _same_file_overlaps(sources: Sequence[SourceFrames]) -> dict[int, list[int]]:
    """Per source: the earlier sources of the same file whose time span overlaps its own."""
    by_file: dict[str, list[int]] = defaultdict(list)
    overlaps: dict[int, list[int]] = defaultdict(list)
    for i, source in enumerate(sources):
        for earlier in by_file[source.source_hash]:
            if _overlap(source.span, sources[earlier].span):
                overlaps[i].append(earlier)
        by_file[source.source_hash].append(i)
    return overlaps


def _near_duplicate_shares(sources: Sequence[SourceFrames], max_distance: int,
                           min_match: float) -> dict[int, dict[int, float]]:
    """Per source: the earlier sources of other files whose matching share reaches `min_match`, with the share."""
    counts = np.array([len(s.hashes) for s in sources], dtype=np.int64)
    if counts.sum() == 0:
        return {}
    owner = np.repeat(np.arange(len(sources), dtype=np.int64), counts)
    hashes = np.concatenate([np.asarray(s.hashes, dtype=np.uint64) for s in sources])
    files = {h: i for i, h in enumerate(dict.fromkeys(s.source_hash for s in sources))}
    file_of = np.array([files[s.source_hash] for s in sources], dtype=np.int64)

    pairs = HammingIndex(hashes).search(hashes, max_distance)
    source, other = owner[pairs.queries], owner[pairs.stored]
    wanted = (other < source) & (file_of[other] != file_of[source])
    frame, source, other = pairs.queries[wanted], source[wanted], other[wanted]
    # Each of the source's frames counts once per other source, however many of the other's frames it matches.
    triples = np.unique(np.stack([source, other, frame], axis=1), axis=0)
    pair_keys, matched = np.unique(triples[:, :2], axis=0, return_counts=True)
    shares: dict[int, dict[int, float]] = defaultdict(dict)
    for (a, b), count in zip(pair_keys.tolist(), matched.tolist(), strict=True):
        share = count / int(counts[a])
        if share >= min_match:
            shares[a][b] = share
    return shares


def find_duplicates(sources: Sequence[SourceFrames], max_distance: int, min_match: float) -> list[str | None]:
    """For each source, in order: a description of the kept source it duplicates, or None when it is kept."""
    same_file = _same_file_overlaps(sources)
    near = _near_duplicate_shares(sources, max_distance, min_match)
    kept = np.zeros(len(sources), dtype=bool)
    reasons: list[str | None] = []
    for i, source in enumerate(sources):
        candidates = sorted({*same_file.get(i, ()), *near.get(i, {})})
        first = next((j for j in candidates if kept[j]), None)
        if first is None:
            kept[i] = True
            reasons.append(None)
            continue
        other = sources[first]
        if other.source_hash == source.source_hash:
            reasons.append(f"same file as row {other.row} ({other.label}) with an overlapping time span "
                           f"{source.span[0]:.2f}-{source.span[1]:.2f}s vs {other.span[0]:.2f}-{other.span[1]:.2f}s")
        else:
            reasons.append(f"near-duplicate of row {other.row} ({other.label}): {near[i][first]:.0%} of sampled "
                           f"frames within Hamming distance {max_distance}")
    return reasons
