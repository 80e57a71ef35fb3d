"""Near-duplicate search at scale: the multi-index Hamming index against brute force, measured side by side.

    python benchmarks/bench_dedupe.py [--hashes 1000000] [--radius 10] [--frames 16] [--brute-force 20000]

1. Index: `--hashes` random 64-bit hashes (a third of them near-copies of earlier ones) indexed, then every one
   of them queried for all stored hashes within `--radius` bits (the self-join finalize needs).
2. Dedupe: the same hashes as sources of `--frames` sampled frames each, through `find_duplicates` (what
   curation's finalize runs), with a third of the sources near-copies of earlier ones.
3. Brute force: the pairwise comparison the index replaces, timed on `--brute-force` hashes and extrapolated
   (it is quadratic) to `--hashes`.

Reports seconds and memory: the index's arrays and the process's peak resident size.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from show1.data.dedupe import SourceFrames, find_duplicates
from show1.data.hamming_index import HammingIndex


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def planted(count: int, seed: int) -> np.ndarray:
    """Random hashes; every third one is an earlier one with 0-15 bits flipped (vectorised)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=count, dtype=np.uint64)
    copies = np.arange(1, count, 3)
    originals = (rng.random(len(copies)) * copies).astype(np.int64)
    flips = np.zeros(len(copies), dtype=np.uint64)
    for _ in range(15):
        use = rng.random(len(copies)) < 0.5
        flips[use] |= np.uint64(1) << rng.integers(0, 64, size=int(use.sum())).astype(np.uint64)
    hashes[copies] = hashes[originals] ^ flips
    return hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--radius", type=int, default=10)
    parser.add_argument("--frames", type=int, default=16, help="sampled frames per source (curate.filters)")
    parser.add_argument("--min-match", type=float, default=0.5)
    parser.add_argument("--brute-force", type=int, default=20_000, help="hashes for the brute-force baseline")
    args = parser.parse_args()

    HammingIndex(planted(1000, 0)).search(planted(10, 1), args.radius)  # compile (or load) the kernel first
    hashes = planted(args.hashes, seed=1)
    before = peak_rss_mb()
    start = time.perf_counter()
    index = HammingIndex(hashes)
    built = time.perf_counter()
    pairs = index.search(hashes, args.radius)
    searched = time.perf_counter()
    search_seconds = searched - built
    print(f"index: {args.hashes:,} hashes built in {built - start:.2f} s ({index.nbytes / 2**20:.0f} MiB), "
          f"all of them queried at radius {args.radius} in {search_seconds:.2f} s: "
          f"{len(pairs.queries) - args.hashes:,} pairs besides each hash itself; "
          f"peak RSS {peak_rss_mb():.0f} MiB (+{peak_rss_mb() - before:.0f})")
    del index, pairs

    rng = np.random.default_rng(2)
    count = args.hashes // args.frames
    frames = rng.integers(0, 2**64, size=(count, args.frames), dtype=np.uint64)
    copies = np.arange(1, count, 3)
    originals = (rng.random(len(copies)) * copies).astype(np.int64)
    noise = np.zeros((len(copies), args.frames), dtype=np.uint64)
    for _ in range(8):
        noise |= np.uint64(1) << rng.integers(0, 64, size=noise.shape).astype(np.uint64)
    frames[copies] = frames[originals] ^ noise
    sources = [SourceFrames(i, f"s{i}", f"file{i}", (0.0, 2.0), frames[i]) for i in range(count)]
    start = time.perf_counter()
    reasons = find_duplicates(sources, args.radius, args.min_match)
    took = time.perf_counter() - start
    print(f"dedupe: {count:,} sources x {args.frames} frames in {took:.2f} s, "
          f"{sum(r is not None for r in reasons):,} rejected as near-duplicates; peak RSS {peak_rss_mb():.0f} MiB")

    small = planted(args.brute_force, seed=3)
    start = time.perf_counter()
    found = 0
    for chunk in range(0, len(small), 1000):
        found += int((np.bitwise_count(small[chunk:chunk + 1000, None] ^ small[None, :]) <= args.radius).sum())
    brute = time.perf_counter() - start
    estimate = brute * (args.hashes / args.brute_force) ** 2
    print(f"brute force: {args.brute_force:,} hashes in {brute:.2f} s ({found - len(small):,} pairs); "
          f"{args.hashes:,} would take about "
          f"{estimate:,.0f} s ({estimate / search_seconds:,.0f}x the index search)")


if __name__ == "__main__":
    main()
