"""One chunk of manifest rows → its shard and its part file (the commit record), on any worker.

Each row of the chunk is decoded (`show1.data.source_row`), hashed and encoded on its own thread while the next row
decodes; a source that repeats an earlier source of the same chunk is not stored; the shard is written whole, then the
part file commits the chunk. A chunk whose part file already commits the same rows and settings is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from show1.config import Curate
from show1.data import clip_codec, dedupe, shards
from show1.data.errors import Rejected
from show1.data.folder import DataFolder
from show1.data.manifest import ManifestRow
from show1.data.source_row import KeptSource, process_row
from show1.faults import fault_point

PARTS = "parts"
SHARDS = "shards"
# Bumped whenever the same rows and settings would curate to other outputs, so that parts written by an older
# show1 are curated again rather than mixed in. 2: `motion` is measured over the frames the clips use, and every
# size and the thumbnail are scaled by swscale straight from the decoded frame. 3: frames stored encoded.
METHOD = 3


@dataclass(frozen=True)
class ChunkJob:
    """One chunk's work: its manifest rows, where its shard and part file go, and the fingerprint that commits it."""

    index: int
    rows: tuple[ManifestRow, ...]
    fingerprint: str
    out: DataFolder
    manifest_dir: Path
    cache: Path
    settings: Curate
    source_ids: dict[int, str]
    # Leave out of the shard the frames of sources that repeat an earlier source of this chunk (see `run_chunk`).
    drop_duplicates: bool = True

    @property
    def part_name(self) -> str:
        return part_name(self.index)

    def shard_name(self, records: list[dict[str, Any]]) -> str:
        """The chunk's shard, named by what makes its frames: a chunk curated from other rows or settings never
        overwrites the shard that the published index reads (that one is removed once a new index replaces it).
        The key is the same on every machine: the method, the settings, and each kept source's file hash and span
        (not the manifest's folder or its files' times). `records`: every source the chunk kept, before any is
        dropped as a repeat."""
        key = {"method": METHOD, "settings": self.settings.model_dump(
                   mode="json", exclude={"split", "rows_per_shard", "executor"}),
               "sources": [(r["source_key"], r["source_hash"], r["span"]) for r in records]}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"{SHARDS}/shard-{self.index:05d}-{digest}.safetensors"


def part_name(index: int) -> str:
    """The name, in the output folder, of chunk `index`'s part file."""
    return f"{PARTS}/part-{index:05d}.json"


def quarantine_row(row: ManifestRow, rejection: Rejected) -> dict[str, Any]:
    caption = row.caption if row.caption is None else row.caption[:200]
    return {"row": row.row, "reason": rejection.reason, "error": rejection.message,
            "video": row.video, "caption": caption, "id": row.id}


def frame_digests(frames: dict[str, np.ndarray], size_keys: list[str]) -> list[bytes]:
    """sha256 of each frame's bytes at every size, in the order of `size_keys`."""
    count = len(frames[size_keys[0]])
    digests = []
    for i in range(count):
        digest = hashlib.sha256()
        for key in size_keys:
            digest.update(frames[key][i].tobytes())
        digests.append(digest.digest())
    return digests


def clip_content_hash(digests: list[bytes], first: int, count: int) -> str:
    """A clip's content hash: sha256 over its frames' digests (see `frame_digests`)."""
    return hashlib.sha256(b"".join(digests[first:first + count])).hexdigest()


def _source_record(kept: KeptSource, source_key: str, cfg: Curate) -> dict[str, Any]:
    clip = cfg.clip
    digests = frame_digests(kept.frames, [s.key for s in clip.sizes])
    clips = []
    for number, first in enumerate(kept.firsts):
        t0 = kept.span[0] + first / clip.fps
        clips.append({"clip_id": f"{kept.source_id}-{number:04d}", "frame_start": first,
                      "start": round(t0, 4), "end": round(t0 + clip.frames / clip.fps, 4),
                      "content_hash": clip_content_hash(digests, first, clip.frames)})
    row = kept.row
    return {
        "row": row.row, "source_id": kept.source_id, "source_key": source_key, "caption": kept.caption,
        "source": row.video, "source_hash": kept.source_hash, "split": row.split,
        "span": list(kept.span), "source_width": kept.info.width, "source_height": kept.info.height,
        "rotation": kept.info.rotation,
        "source_fps": round(kept.info.fps, 4), "codec": kept.info.codec, "motion": round(kept.motion, 4),
        "frame_hashes": [f"{int(h):016x}" for h in kept.hashes], "clips": clips,
    }


@dataclass(frozen=True)
class ChunkReport:
    index: int
    skipped: bool
    kept: int
    rejected: int


def read_part(out: DataFolder, part: str, fingerprint: str) -> dict[str, Any] | None:
    """The part file `part` of `out` when it commits a chunk curated with this fingerprint, else None."""
    try:
        committed = out.read_json(part)  # one read, no existence check first: a request less on an object store
    except (ValueError, FileNotFoundError, IsADirectoryError):
        return None
    return committed if isinstance(committed, dict) and committed.get("fingerprint") == fingerprint else None


# Rows of a chunk decoded at once: the next row decodes while this one's frames are hashed. Measured with
# benchmarks/bench_curate.py on the demo, 2 cores (before the hashing moved onto the rows' threads and duplicates
# within a chunk stopped being written): 0.61x the bare decode rate one row at a time, 0.68-0.73x with two,
# 0.72-0.75x with three (not worth a third source's frames in memory). The outputs are the same.
ROWS_IN_FLIGHT = 2


@dataclass(frozen=True)
class CuratedRow:
    """A kept row: the record the part file lists it with, and its frames encoded at every size."""

    record: dict[str, Any]
    encoded: dict[str, bytes]

    @property
    def key(self) -> str:
        return self.record["source_key"]


def encode_source(kept: KeptSource, cfg: Curate) -> dict[str, bytes]:
    """The source's frames at every size, encoded as its shard stores them, with a keyframe at every clip's first
    frame (`show1.data.clip_codec`)."""
    return {size: clip_codec.encode_frames(frames, cfg.encoding, kept.firsts, cfg.clip.fps)
            for size, frames in kept.frames.items()}


def source_key(row: ManifestRow) -> str:
    """The name of a row's tensors in its shard (`<key>/<W>x<H>`) and of its record in the part file."""
    return f"r{row.row:07d}"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (what a container or `taskset` grants), else the count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class DecoderShares:
    """The decoding threads each row gets: this process's CPUs shared among the rows that its running chunks decode
    at once (up to ROWS_IN_FLIGHT each). FFmpeg's own choice gives every decoder a thread per CPU + 1, so two rows in
    flight on 2 CPUs ran 6 decoding threads beside the 2 converting ones; one thread each cut curation's wall time
    by about 7% there (20 alternating runs of the demo). A row decoding alone with spare CPUs still gets several."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows = 0

    @contextlib.contextmanager
    def decoding(self, rows: int) -> Iterator[None]:
        """Count `rows` more rows decoding at once in this process, for the duration."""
        with self._lock:
            self._rows += rows
        try:
            yield
        finally:
            with self._lock:
                self._rows -= rows

    def threads(self) -> int:
        with self._lock:
            return max(1, usable_cpus() // max(1, self._rows))


DECODERS = DecoderShares()


def _row_outcomes(job: ChunkJob) -> Iterator[tuple[ManifestRow, CuratedRow | Rejected]]:
    """Each row of the chunk with what became of it, in manifest order."""

    def attempt(row: ManifestRow) -> CuratedRow | Rejected:
        try:
            kept = process_row(row, job.manifest_dir, job.settings, job.cache, job.source_ids.get(row.row),
                               threads=DECODERS.threads())
        except Rejected as rejection:
            return rejection
        # Hashed and encoded here, on the row's thread, while the next row decodes; the decoded frames are freed
        # then, so a chunk holds its sources' encoded frames only (~0.5 MB per paper clip, 40x less).
        return CuratedRow(_source_record(kept, source_key(row), job.settings), encode_source(kept, job.settings))

    # In manifest order, whichever row finishes first.
    at_once = max(1, min(ROWS_IN_FLIGHT, len(job.rows)))
    with DECODERS.decoding(at_once), ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="show1-row") as pool:
        yield from zip(job.rows, pool.map(attempt, job.rows), strict=True)


def repeats_within(records: list[dict[str, Any]], cfg: Curate) -> set[str]:
    """The source keys of the records that repeat an earlier record of the same list (the rule of `dedupe`)."""
    reasons = dedupe.find_duplicates([source_frames(r) for r in records], cfg.filters.dedup_max_distance,
                                     cfg.filters.dedup_min_match)
    return {r["source_key"] for r, reason in zip(records, reasons, strict=True) if reason}


def run_chunk(job: ChunkJob, on_row: Callable[[], None] | None = None, force: bool = False) -> ChunkReport:
    """Curate one chunk into its shard and part file, unless an identical run already did.

    A source that repeats an earlier source of the same chunk is a duplicate whatever the other chunks hold (unless
    that earlier source is itself dropped for a source of an earlier chunk: rare, see `keep_duplicates`), so its
    frames are not written at all; the part file lists it as `dropped`, as `finalize` lists the duplicates it
    removes from a shard afterwards."""
    if not force and read_part(job.out, job.part_name, job.fingerprint) is not None:
        for _ in job.rows:
            on_row and on_row()
        return ChunkReport(job.index, skipped=True, kept=0, rejected=0)
    kept: list[CuratedRow] = []
    rejected_records = []
    for row, outcome in _row_outcomes(job):
        if isinstance(outcome, Rejected):
            rejected_records.append(quarantine_row(row, outcome))
        else:
            kept.append(outcome)
        if on_row:
            on_row()
    records = [k.record for k in kept]
    dropped = repeats_within(records, job.settings) if job.drop_duplicates and len(kept) > 1 else set()
    tensors = {shards.tensor_name(k.key, size): shards.as_tensor(encoded)
               for k in kept if k.key not in dropped for size, encoded in k.encoded.items()}
    shard = job.shard_name(records) if tensors else None
    if shard:
        shards.write_shard(job.out, shard, tensors)
        fault_point("curate.chunk.after_shard")
    # The part file commits the chunk: written only after its shard is in place.
    job.out.write_json(job.part_name, {
        "chunk": job.index, "fingerprint": job.fingerprint, "shard": shard,
        "sources": records, "rejected": rejected_records} | ({"dropped": sorted(dropped)} if dropped else {}))
    return ChunkReport(job.index, skipped=False, kept=len(kept), rejected=len(rejected_records))


def source_frames(source: dict[str, Any]) -> dedupe.SourceFrames:
    return dedupe.SourceFrames(
        row=source["row"], label=source["source_id"], source_hash=source["source_hash"],
        span=(float(source["span"][0]), float(source["span"][1])),
        hashes=np.array([int(h, 16) for h in source["frame_hashes"]], dtype=np.uint64))
