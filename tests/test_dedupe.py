"""Near-duplicate search through the multi-index Hamming index: exact (equal to brute force), deterministic, and
the frames of rejected duplicates leave the shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import media
import numpy as np
import pytest
from safetensors.numpy import load_file

from show1.config import Params
from show1.data.curate import curate, plan_curation, run_chunk
from show1.data.dedupe import SourceFrames, find_duplicates
from show1.data.hamming_index import HammingIndex, substring_radii


def _flip(value: int, count: int, rng: np.random.Generator) -> int:
    for bit in rng.choice(64, size=count, replace=False):
        value ^= 1 << int(bit)
    return value


def _hashes_with_neighbours(count: int, seed: int) -> np.ndarray:
    """Random 64-bit hashes where every third one is a copy of an earlier one with 0-16 bits flipped."""
    rng = np.random.default_rng(seed)
    values = [int(v) for v in rng.integers(0, 2**64, size=count, dtype=np.uint64)]
    for i in range(1, count, 3):
        values[i] = _flip(values[int(rng.integers(0, i))], int(rng.integers(0, 17)), rng)
    return np.array(values, dtype=np.uint64)


def _brute_force_pairs(queries: np.ndarray, stored: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    q, s = np.nonzero(np.bitwise_count(queries[:, None] ^ stored[None, :]) <= radius)
    order = np.lexsort((s, q))
    return q[order], s[order]


@pytest.mark.parametrize("radius", [0, 1, 3, 7, 10, 13, 21])
def test_the_index_finds_exactly_the_pairs_brute_force_finds(radius: int) -> None:
    stored = _hashes_with_neighbours(2000, seed=radius)
    queries = np.concatenate([stored[:300], _hashes_with_neighbours(300, seed=100 + radius)])
    found = HammingIndex(stored).search(queries, radius)
    expected = _brute_force_pairs(queries, stored, radius)
    assert len(expected[0]) > len(queries) // 3  # the planted neighbours are there to be found
    assert np.array_equal(found.queries, expected[0]) and np.array_equal(found.stored, expected[1])


def test_substring_radii_cover_every_pair_within_the_radius() -> None:
    # Pigeonhole: a pair further apart than each substring's radius in every substring is more than r apart.
    for radius in range(65):
        radii = substring_radii(radius)
        assert sum(r + 1 for r in radii) == radius + 1, radius


def test_a_query_with_more_neighbours_than_slots_gets_all_of_them() -> None:
    stored = np.array([(1 << 40) | (1 << bit) for bit in range(30)] + [1 << 40], dtype=np.uint64)
    found = HammingIndex(stored).search(np.array([1 << 40], dtype=np.uint64), 1)
    assert found.stored.tolist() == list(range(31))


def test_a_search_leaves_torch_on_its_own_thread_count() -> None:
    # numba's OpenMP layer would set the OpenMP thread count that torch shares: a curation in a training process
    # (or an xdist worker) made torch run on every core despite OMP_NUM_THREADS=1.
    code = ("import numpy as np, torch\n"
            "from show1.data.hamming_index import HammingIndex\n"
            "before = torch.get_num_threads()\n"
            "HammingIndex(np.arange(5000, dtype=np.uint64)).search(np.arange(500, dtype=np.uint64), 10)\n"
            "print(before, torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], env=os.environ | {"OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]


def test_a_bad_radius_is_refused() -> None:
    with pytest.raises(ValueError, match="between 0 and 64"):
        HammingIndex(np.zeros(3, dtype=np.uint64)).search(np.zeros(1, dtype=np.uint64), 65)


def brute_force_duplicates(sources: list[SourceFrames], max_distance: int, min_match: float) -> list[str | None]:
    """The reference rule, written plainly: each source against every kept source before it, in order."""
    kept: list[SourceFrames] = []
    reasons: list[str | None] = []
    for source in sources:
        reason = None
        for other in kept:
            if other.source_hash == source.source_hash:
                if source.span[0] < other.span[1] and other.span[0] < source.span[1]:
                    reason = f"same file as row {other.row}"
                    break
                continue
            distances = np.bitwise_count(source.hashes[:, None] ^ other.hashes[None, :]).min(axis=1)
            share = float(np.mean(distances <= max_distance))
            if share >= min_match:
                reason = f"near-duplicate of row {other.row} ({other.label}): {share:.0%}"
                break
        if reason is None:
            kept.append(source)
        reasons.append(reason)
    return reasons


def _planted_sources(count: int, frames: int, seed: int) -> list[SourceFrames]:
    """`count` sources of `frames` hashes each (10k hashes at 625 x 16): a third are near-copies of an earlier
    source (each frame 4-16 bits away, so some copies cross the match threshold and some do not, and chains of
    copies of copies), and some are windows of one file with overlapping or separate time spans."""
    rng = np.random.default_rng(seed)
    sources: list[SourceFrames] = []
    for i in range(count):
        kind = rng.random()
        if sources and kind < 0.33:
            base = sources[int(rng.integers(0, len(sources)))]
            hashes = np.array([_flip(int(h), int(rng.integers(4, 17)), rng) for h in base.hashes], dtype=np.uint64)
            sources.append(SourceFrames(i, f"s{i}", f"file{i}", (0.0, 2.0), hashes))
        elif sources and kind < 0.43:
            base = sources[int(rng.integers(0, len(sources)))]  # another window of the same file
            start = float(rng.choice([0.0, 1.0, 2.0, 4.0]))
            hashes = rng.integers(0, 2**64, size=frames, dtype=np.uint64)
            sources.append(SourceFrames(i, f"s{i}", base.source_hash, (start, start + 2.0), hashes))
        else:
            hashes = rng.integers(0, 2**64, size=frames, dtype=np.uint64)
            sources.append(SourceFrames(i, f"s{i}", f"file{i}", (0.0, 2.0), hashes))
    return sources


def test_dedupe_through_the_index_equals_brute_force_on_10k_hashes() -> None:
    sources = _planted_sources(625, 16, seed=3)
    assert sum(len(s.hashes) for s in sources) == 10_000
    found = find_duplicates(sources, max_distance=10, min_match=0.5)
    expected = brute_force_duplicates(sources, max_distance=10, min_match=0.5)
    rejected = [i for i, reason in enumerate(expected) if reason]
    assert 50 < len(rejected) < 400  # near-copies on both sides of the threshold, and same-file overlaps
    assert any(r and r.startswith("same file") for r in expected)
    assert [i for i, reason in enumerate(found) if reason] == rejected
    for got, want in zip(found, expected, strict=True):  # the same kept source and share named as the reason
        assert (got is None) == (want is None) and (want is None or got.startswith(want)), (got, want)


def test_only_kept_sources_reject_others() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**64, size=8, dtype=np.uint64)
    b = np.array([_flip(int(h), 6, rng) for h in a], dtype=np.uint64)  # 6 bits from a
    c = np.array([_flip(int(h), 6, rng) for h in b], dtype=np.uint64)  # 6 from b, about 12 from a
    assert np.mean(np.bitwise_count(c ^ a) <= 10) < 0.5 <= np.mean(np.bitwise_count(c ^ b) <= 10)
    sources = [SourceFrames(i, name, name, (0.0, 1.0), h)
               for i, (name, h) in enumerate(zip("abc", (a, b, c), strict=True))]
    reasons = find_duplicates(sources, max_distance=10, min_match=0.5)
    # b repeats a and is dropped; c is close to b only, and b was not kept: c stays.
    assert reasons[0] is None and reasons[1].startswith("near-duplicate of row 0 (a)") and reasons[2] is None


def _stored_tensors(out: Path) -> set[str]:
    return {name for shard in (out / "shards").glob("*.safetensors") for name in load_file(str(shard))}


def test_a_duplicate_dropped_from_its_shard_comes_back_when_it_is_kept_again(
        root: Path, stage: Callable[..., str], library: dict[str, Path], make_params: Callable[..., Params],
        tmp_path: Path) -> None:
    original, copy = stage("good0", as_name="first.mp4"), stage("reencoded")
    manifest = media.write_manifest_csv(root / "m.csv", [
        {"video": original, "caption": "The red square."},
        {"video": copy, "caption": "The red square again, re-encoded."},
    ])
    params = make_params({"curate": {"rows_per_shard": 1}})
    out = tmp_path / "out"
    curate(manifest, out, params)
    part = json.loads((out / "parts" / "part-00001.json").read_text())
    assert part["dropped"] == ["r0000001"] and part["shard"] is None  # its only source went: so did its shard
    assert not list((out / "shards").glob("shard-00001*"))
    assert {name.split("/")[0] for name in _stored_tensors(out)} == {"r0000000"}

    # Row 0's file now holds other content: the copy is no longer a duplicate, and its frames are needed again.
    shutil.copyfile(library["good1"], root / original)
    summary = curate(manifest, out, params)
    assert summary.kept_sources == 2 and summary.rejected_rows == 0
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert {row["row"] for row in index} == {0, 1}
    assert {row["tensor"] for row in index} == {name.split("/")[0] for name in _stored_tensors(out)}
    assert not json.loads((out / "parts" / "part-00001.json").read_text()).get("dropped")


def _part(out: Path, index: int) -> dict:
    return json.loads((out / "parts" / f"part-{index:05d}.json").read_text())


def test_a_duplicate_of_a_source_of_its_own_chunk_is_never_written(
        root: Path, stage: Callable[..., str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    manifest = media.write_manifest_csv(root / "m.csv", [
        {"video": stage("good0"), "caption": "The red square."},
        {"video": stage("reencoded"), "caption": "The red square again, re-encoded."},
        {"video": stage("good1"), "caption": "Something else."},
    ])
    params = make_params()  # 4 rows per chunk: one chunk
    out = tmp_path / "out"
    run_chunk(plan_curation(manifest, out, params).job(0))  # the chunk alone, before any finalize
    assert _part(out, 0)["dropped"] == ["r0000001"]
    assert {name.split("/")[0] for name in _stored_tensors(out)} == {"r0000000", "r0000002"}

    summary = curate(manifest, out, params)  # the chunk is committed: only finalize runs
    assert summary.chunks_skipped == 1 and summary.kept_sources == 2
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["row"], q["reason"]) for q in quarantine] == [(1, "duplicate")]

    # The same shard, byte for byte, as writing every source's frames and dropping the copy's afterwards.
    everything = tmp_path / "everything"
    plan = plan_curation(manifest, everything, params).keeping_duplicates([0])
    run_chunk(plan.job(0))
    assert "dropped" not in _part(everything, 0)
    assert len(_stored_tensors(everything)) == 3 * len(params.curate.clip.sizes)
    curate(manifest, everything, params)
    [shard] = [p.relative_to(out).as_posix() for p in (out / "shards").glob("shard-00000-*.safetensors")]
    for name in (shard, "index.jsonl", "quarantine.jsonl"):
        assert (everything / name).read_bytes() == (out / name).read_bytes(), name


def test_a_source_dropped_within_its_chunk_is_written_after_all_when_an_earlier_chunk_drops_what_it_repeats(
        root: Path, stage: Callable[..., str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    # Three windows of one 4 s video: A (0-2 s) in chunk 0, B (1-3 s) and C (2.5-3.5 s) in chunk 1. B overlaps A,
    # C overlaps B but not A. Within chunk 1, C repeats B; over the manifest B repeats A and is dropped, so C is
    # kept: its frames, left out of chunk 1's shard, are needed, and chunk 1 is curated again with them.
    (root / "videos").mkdir()
    media.write_video(root / "videos" / "four-seconds.mp4", frames=96, seed=5)
    manifest = media.write_manifest_csv(root / "m.csv", [
        {"video": "videos/four-seconds.mp4", "caption": "Window A.", "start": 0.0, "end": 2.0},
        {"video": stage("good1"), "caption": "Another video.", "start": "", "end": ""},
        {"video": "videos/four-seconds.mp4", "caption": "Window B.", "start": 1.0, "end": 3.0},
        {"video": "videos/four-seconds.mp4", "caption": "Window C.", "start": 2.5, "end": 3.5},
    ])
    out = tmp_path / "out"
    summary = curate(manifest, out, make_params({"curate": {"rows_per_shard": 2}}))
    assert summary.kept_sources == 3
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["row"], q["reason"]) for q in quarantine] == [(2, "duplicate")]
    assert _part(out, 1)["dropped"] == ["r0000002"]
    stored = {name.split("/")[0] for name in _stored_tensors(out)}
    assert stored == {"r0000000", "r0000001", "r0000003"}

    # What one chunk per row (no chunk holds two sources) gives: the same clips, the same content.
    alone = tmp_path / "alone"
    curate(manifest, alone, make_params({"curate": {"rows_per_shard": 1}}))
    clips = [{k: r[k] for k in ("clip_id", "content_hash", "row", "start", "end")}
             for r in (json.loads(line) for line in (out / "index.jsonl").read_text().splitlines())]
    clips_alone = [{k: r[k] for k in ("clip_id", "content_hash", "row", "start", "end")}
                   for r in (json.loads(line) for line in (alone / "index.jsonl").read_text().splitlines())]
    assert clips == clips_alone and {c["row"] for c in clips} == {0, 1, 3}
