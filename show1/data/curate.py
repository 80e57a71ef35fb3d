"""Curation: manifest rows → filtered, clipped, resized sources in shards, plus index and quarantine.

The work is split into chunks of `curate.rows_per_shard` consecutive manifest rows. Each chunk is
processed independently (in any order, in parallel) into one shard and one part file; the part file is
written last and is the commit marker, so a killed run leaves no half-written shard and a rerun skips
the chunks already done. `finalize` then assembles, in manifest order, the outputs other tools read:

  OUT/index.jsonl       one row per kept clip
  OUT/index.parquet     the same rows as columns: what training opens (show1/data/clip_index.py)
  OUT/quarantine.jsonl  one row per rejected manifest row, with `reason` and `error`
  OUT/summary.json      counts (also the DVC metrics of the curate stage)
  OUT/shards/, OUT/parts/

A curation never damages the one it replaces. Shards are named by their chunk's fingerprint, so a new run writes
beside the shards the published index reads; the index, quarantine and summary are replaced together (staged in
OUT/publish/, committed by one marker file: `publish`) and only when the run keeps something; only then are the
shards and part files no longer needed removed. A run that fails, is refused (nothing kept: its quarantine and
summary go to OUT/refused/) or is killed at any point leaves the published curation as it was.

OUT is a local folder or any fsspec URL (`s3://bucket/prefix`): every file goes through `DataFolder`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import av
import numpy as np

from show1 import atomic
from show1.config import Clip, Curate, Params
from show1.data import captions, clip_codec, dedupe, manifest, quality, shards, sources, video
from show1.data.clip_index import INDEX_PARQUET, index_bytes
from show1.data.errors import Rejected
from show1.data.folder import DataFolder
from show1.data.manifest import ManifestRow
from show1.faults import fault_point

INDEX = "index.jsonl"
QUARANTINE = "quarantine.jsonl"
SUMMARY = "summary.json"
PARTS = "parts"
SHARDS = "shards"
PUBLISH = "publish"                 # the next index, quarantine and summary, staged before they replace the live ones
PUBLISH_COMMIT = f"{PUBLISH}/COMMIT"
REFUSED = "refused"                 # the quarantine and summary of a run that kept nothing (nothing else changes)
_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
# Bumped whenever the same rows and settings would curate to other outputs, so that parts written by an older
# show1 are curated again rather than mixed in. 2: `motion` is measured over the frames the clips use, and every
# size and the thumbnail are scaled by swscale straight from the decoded frame. 3: frames stored encoded.
METHOD = 3


@dataclass(frozen=True)
class CurationPlan:
    """What a curation run will do: the manifest's rows, the ones rejected before any file is opened (screened), the
    others cut into chunks, and the settings hash."""

    manifest: Path
    out: DataFolder
    cache: Path
    settings: Curate
    rows: tuple[ManifestRow, ...]
    rows_per_chunk: int
    # Clip-id prefix per manifest row, unique across the manifest (see `assign_source_ids`).
    source_ids: dict[int, str] = field(default_factory=dict)
    # Chunks that store every kept source's frames, even those that repeat an earlier source of the chunk: a
    # source dropped that way turned out to be kept (`FramesDropped`), so the chunk is curated again with them all.
    keep_duplicates: frozenset[int] = frozenset()
    # Rows rejected from the manifest and their files' paths alone (`screen`): quarantined by `finalize`, never in a
    # chunk, so a manifest of a million dead rows makes no chunk, shard or part file.
    screened: dict[int, Rejected] = field(default_factory=dict)
    # Size and mtime of each chunked row's local file (None: a URL), so a replaced file is curated again.
    stamps: dict[int, list[int] | None] = field(default_factory=dict)

    @cached_property
    def chunked(self) -> tuple[ManifestRow, ...]:
        """The rows chunks curate: every row not screened, in manifest order."""
        return tuple(r for r in self.rows if r.row not in self.screened)

    @property
    def chunk_count(self) -> int:
        return (len(self.chunked) + self.rows_per_chunk - 1) // self.rows_per_chunk

    def chunk(self, index: int) -> tuple[ManifestRow, ...]:
        return self.chunked[index * self.rows_per_chunk:(index + 1) * self.rows_per_chunk]

    @cached_property
    def fingerprints(self) -> tuple[str, ...]:
        """Per chunk: changes whenever the chunk's rows, their files or a setting that shapes the output do."""
        settings = self.settings.model_dump(mode="json", exclude={"split", "rows_per_shard", "executor"})
        manifest_dir = self.manifest.parent
        prints = []
        for index in range(self.chunk_count):
            payload = {
                "method": METHOD,
                "settings": settings,
                "manifest_dir": str(manifest_dir.resolve()),
                "rows": [r.fingerprint_fields() | {"rejection": r.rejection and r.rejection.reason,
                                                   "source_id": self.source_ids.get(r.row),
                                                   "file": self.stamps.get(r.row)}
                         for r in self.chunk(index)],
            }
            prints.append(hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest())
        return tuple(prints)

    def fingerprint(self, index: int) -> str:
        return self.fingerprints[index]

    def part_name(self, index: int) -> str:
        return part_name(index)

    def job(self, index: int) -> ChunkJob:
        """Everything a worker needs to curate chunk `index`, and nothing of the other chunks (a plan of a
        WebVid-size manifest holds millions of rows; a chunk's job holds `rows_per_chunk`)."""
        rows = self.chunk(index)
        return ChunkJob(index=index, rows=rows, fingerprint=self.fingerprint(index), out=self.out,
                        manifest_dir=self.manifest.parent, cache=self.cache, settings=self.settings,
                        source_ids={r.row: self.source_ids[r.row] for r in rows if r.row in self.source_ids},
                        drop_duplicates=index not in self.keep_duplicates)

    def keeping_duplicates(self, chunks: list[int]) -> CurationPlan:
        """This plan, with `chunks` storing the frames of every kept source (see `keep_duplicates`)."""
        again = replace(self, keep_duplicates=self.keep_duplicates | set(chunks))
        for computed in ("fingerprints", "chunked"):  # the run's own, not computed again for every row
            if computed in self.__dict__:
                again.__dict__[computed] = self.__dict__[computed]
        return again


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


def screen(row: ManifestRow, manifest_dir: Path, cfg: Curate,
           located: dict[str, Rejected | list[int] | None] | None = None) -> Rejected | list[int] | None:
    """What curation can tell of a row before it opens any file: its rejection when the manifest's fields or the
    path of its video already rule it out (the reason `process_row` would give: a bad caption wins over a bad path,
    as there), else the size and mtime of its local file (None: a URL, fetched by its chunk).

    `located` caches the path checks by video, so a manifest naming one file a million times stats it once."""
    if row.rejection is not None:
        return row.rejection
    if not row.video:
        return Rejected("missing_video", "the row has no video path or URL")
    found = locate_video(row.video, manifest_dir, cfg, located)
    if isinstance(found, Rejected):
        try:
            captions.check_caption(row.caption, cfg.caption)
        except Rejected as rejection:
            return rejection
    return found


def locate_video(video: str, manifest_dir: Path, cfg: Curate,
                 located: dict[str, Rejected | list[int] | None] | None = None) -> Rejected | list[int] | None:
    """Where a manifest's `video` is, checked without opening it: why it cannot be used (an unsupported scheme, a
    path outside the allowed roots, no such file), else its size and mtime, or None for a URL (fetched later).
    `located` caches the answers by video."""
    if located is not None and video in located:
        return located[video]
    try:
        sources.check_scheme(video)
        found = None if sources.is_url(video) else _stamp(
            sources.resolve_local(video, manifest_dir, cfg.allowed_roots, cfg.allowed_packages))
    except Rejected as rejection:
        found = rejection
    if located is not None:
        located[video] = found
    return found


def _stamp(path: Path) -> list[int] | Rejected:
    try:
        stat = path.stat()
    except OSError as exc:
        return Rejected("missing_file", f"{path}: {exc.strerror or exc}")
    return [stat.st_size, stat.st_mtime_ns]


def assign_source_ids(rows: tuple[ManifestRow, ...] | list[ManifestRow]) -> dict[int, str]:
    """A clip-id prefix per row: the id (or file stem + row) with unsafe characters replaced, made
    unique in manifest order by appending `-r<row>` (and a counter) when two rows would collide."""
    used: set[str] = set()
    ids = {}
    for row in rows:
        base = source_id_for(row)
        candidate, n = base, 1
        while candidate in used:
            candidate = f"{base}-r{row.row}" if n == 1 else f"{base}-r{row.row}-{n}"
            n += 1
        used.add(candidate)
        ids[row.row] = candidate
    return ids


def plan_curation(manifest_path: Path | str, out: Path | str | DataFolder, params: Params,
                  on_row: Callable[[], None] | None = None) -> CurationPlan:
    """Read the manifest, mark the rows that are rejected before any IO (bad fields, repeated ids), and screen the
    others (`screen`); `on_row` is called once per row screened."""
    manifest_path = Path(manifest_path)
    rows = manifest.read_manifest(manifest_path, params.curate.columns)
    seen: dict[str, int] = {}
    checked = []
    for row in rows:
        if row.rejection is None and row.id is not None:
            if row.id in seen:
                row = ManifestRow(row=row.row, video=row.video, caption=row.caption, id=row.id,
                                  rejection=Rejected("duplicate_id", f"id '{row.id}' is already used by row "
                                                     f"{seen[row.id]}"))
            else:
                seen[row.id] = row.row
        checked.append(row)
    usable = [r for r in checked if r.rejection is None]
    screened: dict[int, Rejected] = {}
    stamps: dict[int, list[int] | None] = {}
    located: dict[str, Rejected | list[int] | None] = {}
    for row in checked:
        outcome = screen(row, manifest_path.parent, params.curate, located)
        if isinstance(outcome, Rejected):
            screened[row.row] = outcome
        else:
            stamps[row.row] = outcome
        if on_row:
            on_row()
    return CurationPlan(manifest=manifest_path, out=DataFolder(out), cache=params.paths.cache,
                        settings=params.curate, rows=tuple(checked), rows_per_chunk=params.curate.rows_per_shard,
                        source_ids=assign_source_ids(usable), screened=screened, stamps=stamps)


# ---------------------------------------------------------------------------------------------- sources


@dataclass
class KeptSource:
    """A source that passed every per-row filter, with its sampled frames at every size."""

    row: ManifestRow
    source_id: str
    caption: str
    path: Path
    source_hash: str
    info: video.VideoInfo
    span: tuple[float, float]
    frames: dict[str, np.ndarray]
    firsts: list[int]
    hashes: np.ndarray
    motion: float


def _safe_id(text: str) -> str:
    """Letters, digits, `_`, `-` and `.` only, never starting with a dot (no `..`, no hidden-file names)."""
    return re.sub(r"^\.+", lambda m: "_" * len(m.group()), _ID_CHARS.sub("_", text))


def source_id_for(row: ManifestRow) -> str:
    if row.id:
        return _safe_id(row.id)
    stem = _safe_id(Path(str(row.video).split("?")[0]).stem) or "video"
    return f"{stem}-r{row.row}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fits(width: int, height: int, cfg: Curate) -> bool:
    return width <= cfg.filters.max_width and height <= cfg.filters.max_height


def _check_coded_size(info: video.VideoInfo, cfg: Curate, path: Path) -> None:
    """The decompression-bomb guard, before any frame is decoded: the header's coded size must fit
    max_width x max_height in some orientation (the display rotation is known only after the first decode;
    `_check_header` then checks the displayed size exactly)."""
    f = cfg.filters
    if not (_fits(info.width, info.height, cfg) or _fits(info.height, info.width, cfg)):
        raise Rejected("resolution_too_large", f"{path}: {info.width}x{info.height} frames are larger than "
                                               f"max_width x max_height {f.max_width}x{f.max_height}")


def _check_header(info: video.VideoInfo, cfg: Curate, start: float, end: float | None,
                  path: Path | None = None) -> float:
    """Apply the header-level filters to the displayed size; return the usable duration in seconds."""
    f = cfg.filters
    if not _fits(info.width, info.height, cfg):
        turned = f" (as displayed, rotated {info.rotation} degrees)" if info.rotation else ""
        raise Rejected("resolution_too_large", f"{path or 'the video'}: {info.width}x{info.height}{turned} is "
                                               f"larger than max_width x max_height {f.max_width}x{f.max_height}")
    if not f.min_fps <= info.fps <= f.max_fps:
        raise Rejected("bad_fps", f"{info.fps:.2f} fps is outside [{f.min_fps}, {f.max_fps}]")
    if info.width < f.min_width or info.height < f.min_height:
        raise Rejected("too_small", f"{info.width}x{info.height} is below {f.min_width}x{f.min_height}")
    if not f.min_aspect <= info.aspect <= f.max_aspect:
        raise Rejected("bad_aspect", f"aspect {info.aspect:.2f} ({info.width}x{info.height}) is outside "
                                     f"[{f.min_aspect}, {f.max_aspect}]")
    if np.isnan(info.duration_s):
        return float("nan")
    if start >= info.duration_s:
        raise Rejected("bad_time_span", f"start {start}s is past the end of the {info.duration_s:.2f}s video")
    usable = min(end if end is not None else info.duration_s, info.duration_s) - start
    if usable > f.max_duration_s:
        raise Rejected("too_long", f"{usable:.1f}s > max_duration_s {f.max_duration_s}")
    if usable < f.min_duration_s:
        raise Rejected("too_short", f"{usable:.2f}s < min_duration_s {f.min_duration_s}")
    return usable


def _locate(row: ManifestRow, manifest_dir: Path, cfg: Curate, cache: Path) -> Path:
    assert row.video is not None
    sources.check_scheme(row.video)
    if sources.is_url(row.video):
        return sources.download(row.video, cache, cfg.download)
    return sources.resolve_local(row.video, manifest_dir, cfg.allowed_roots, cfg.allowed_packages)


def _frames_clips_can_use(clip: Clip, grid_frames: int | None) -> int | None:
    """How many grid frames to decode: the frames of the most clips that `grid_frames` (at least the source's grid
    frames; None: unknown) and `clip.max_per_source` allow. The tail after the last clip is left undecoded: about a
    quarter of a 5 s source at the default 29 frames every 29. None: decode to the end."""
    most = clip.max_per_source or None
    if grid_frames is not None and grid_frames >= clip.frames:
        fitting = (grid_frames - clip.frames) // clip.stride + 1
        most = fitting if most is None else min(most, fitting)
    return None if most is None else clip.frames + (most - 1) * clip.stride


def _sample(path: Path, row: ManifestRow, start: float, cfg: Curate, threads: int,
            planned: bool) -> tuple[video.VideoInfo, list[tuple[dict[str, np.ndarray], np.ndarray]]]:
    """The source's header checks, then its frames on the clip grid at every size (and thumbnails). `planned`: from
    the packets' times (`VideoFile.plan_grid`), decode nothing after the last clip that fits and leave out the
    non-reference frames that no grid time picks."""
    with video.VideoFile(path, threads=threads) as source:
        _check_coded_size(source.info, cfg, path)  # before the first decode
        info = source.read_rotation()
        _check_header(info, cfg, start, row.end, path)
        clip = cfg.clip
        plan = source.plan_grid(clip.fps, start=start, end=row.end) if planned else None
        limit = _frames_clips_can_use(clip, plan.most if plan else None)
        frames = (frame for _, frame in source.frames_on_grid(clip.fps, start=start, end=row.end, max_frames=limit,
                                                                plan=plan))
        converter = video.FrameConverter(info.width, info.height, clip.sizes, rotation=info.rotation)
        try:
            return info, video.convert_all(frames, converter)
        except av.FFmpegError as exc:  # swscale cannot convert what the decoder produced
            raise Rejected("undecodable", f"{path}: a decoded frame cannot be converted to RGB: {exc}") from None


def process_row(row: ManifestRow, manifest_dir: Path, cfg: Curate, cache: Path,
                source_id: str | None = None, threads: int = 0) -> KeptSource:
    """Run every per-row check and decode the source (on `threads` decoding threads, 0: FFmpeg's choice); raise
    `Rejected` for anything unusable."""
    if row.rejection is not None:
        raise row.rejection
    if not row.video:
        raise Rejected("missing_video", "the row has no video path or URL")
    caption = captions.check_caption(row.caption, cfg.caption)
    path = _locate(row, manifest_dir, cfg, cache)
    size = path.stat().st_size
    if size > cfg.filters.max_source_bytes:
        raise Rejected("too_large", f"{size} bytes > curate.filters.max_source_bytes {cfg.filters.max_source_bytes}")
    start = row.start or 0.0
    try:
        info, converted = _sample(path, row, start, cfg, threads, planned=True)
    except video.PlanBroken:  # a frame its packets did not announce: decode every frame, the way it always works
        info, converted = _sample(path, row, start, cfg, threads, planned=False)
    clip = cfg.clip
    sampled = len(converted)
    if sampled < clip.frames:
        raise Rejected("too_short", f"{sampled} frames at {clip.fps:g} fps; a clip needs {clip.frames}")
    firsts = list(range(0, sampled - clip.frames + 1, clip.stride))
    if clip.max_per_source:
        firsts = firsts[:clip.max_per_source]
    used = firsts[-1] + clip.frames
    thumbnails = np.stack([thumb for _, thumb in converted[:used]])
    motion = quality.mean_motion(thumbnails)  # over the frames the clips use: the tail after them is not decoded
    if motion < cfg.filters.static_threshold:
        raise Rejected("static", f"mean frame difference {motion:.3f} < static_threshold "
                                 f"{cfg.filters.static_threshold}")
    picks = quality.pick_evenly(used, cfg.filters.dedup_frames)
    hashes = np.array([quality.phash(thumbnails[i]) for i in picks], dtype=np.uint64)
    return KeptSource(
        row=row, source_id=source_id or source_id_for(row), caption=caption, path=path,
        source_hash=file_sha256(path), info=info, span=(start, start + used / clip.fps),
        frames={s.key: np.stack([images[s.key] for images, _ in converted[:used]]) for s in clip.sizes},
        firsts=firsts,
        hashes=hashes, motion=motion)


# ----------------------------------------------------------------------------------------------- chunks


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
    reasons = dedupe.find_duplicates([_source_frames(r) for r in records], cfg.filters.dedup_max_distance,
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


# --------------------------------------------------------------------------------------------- finalize


@dataclass
class CurationSummary:
    """What a curation run produced; written as OUT/summary.json (the curate stage's DVC metrics)."""

    manifest: str
    out: str
    rows: int
    kept_sources: int
    rejected_rows: int
    rejected_by_reason: dict[str, int]
    clips: int
    clips_by_split: dict[str, int]
    frames: int
    source_seconds: float
    chunks_skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _val_by_hash(source_hash: str, fraction: float, seed: int) -> bool:
    value = int(hashlib.sha256(f"{seed}:{source_hash}".encode()).hexdigest()[:15], 16)
    return value / 16**15 < fraction


class FramesDropped(RuntimeError):
    """Kept sources whose frames an earlier finalize dropped from their shards (they were duplicates then)."""

    def __init__(self, chunks: list[int]) -> None:
        super().__init__(f"chunks {chunks} must be curated again: a source now kept was dropped as a duplicate")
        self.chunks = chunks


def _source_frames(source: dict[str, Any]) -> dedupe.SourceFrames:
    return dedupe.SourceFrames(
        row=source["row"], label=source["source_id"], source_hash=source["source_hash"],
        span=(float(source["span"][0]), float(source["span"][1])),
        hashes=np.array([int(h, 16) for h in source["frame_hashes"]], dtype=np.uint64))


def _drop_duplicate_frames(plan: CurationPlan, parts: list[dict[str, Any]], duplicates: dict[int, set[str]]) -> None:
    """Remove the frames of rejected duplicates from their shards (a shard left empty goes away).

    Each part records what was dropped from its shard (`dropped`) before the shard is rewritten, so a run killed
    in between leaves a shard with frames it no longer needs (dropped again next time), never an index row whose
    frames are gone; a later run that keeps one of those sources curates its chunk again (`FramesDropped`)."""
    for index, part in enumerate(parts):
        drop = duplicates.get(index, set())
        if not part["shard"] or not (drop or part.get("dropped")):
            continue
        empty = drop == {s["source_key"] for s in part["sources"]}
        updated = part | {"dropped": sorted(drop)} | ({"shard": None} if empty else {})
        if updated != part:
            plan.out.write_json(plan.part_name(index), updated)
            parts[index] = updated
        if empty:
            plan.out.remove(part["shard"])
        elif drop and plan.out.exists(part["shard"]):
            shards.drop_sources(plan.out, part["shard"], drop)


def finalize(plan: CurationPlan, chunks_skipped: int = 0) -> CurationSummary:
    """Assemble index, quarantine and summary from the part files, in manifest order.

    Near-duplicate search runs here, over every kept source at once (`dedupe`), so its result does not depend on
    how or where chunks ran; the frames of the duplicates it rejects leave the shards.
    """
    parts = []
    for index in range(plan.chunk_count):
        part = read_part(plan.out, plan.part_name(index), plan.fingerprint(index))
        if part is None:
            raise RuntimeError(f"chunk {index} of {plan.out} is not curated yet; run the curation again")
        parts.append(part)
    cfg = plan.settings
    listed = [(index, source) for index, part in enumerate(parts) for source in part["sources"]]
    reasons = dedupe.find_duplicates([_source_frames(source) for _, source in listed],
                                     cfg.filters.dedup_max_distance, cfg.filters.dedup_min_match)
    missing = sorted({index for (index, source), reason in zip(listed, reasons, strict=True)
                      if reason is None and source["source_key"] in parts[index].get("dropped", ())})
    if missing:
        raise FramesDropped(missing)
    rows_by_number = {r.row: r for r in plan.rows}
    quarantine = [quarantine_row(rows_by_number[row], rejection) for row, rejection in plan.screened.items()]
    quarantine += [q for p in parts for q in p["rejected"]]
    kept: list[tuple[dict[str, Any], str]] = []
    duplicates: dict[int, set[str]] = {}
    for (index, source), reason in zip(listed, reasons, strict=True):
        if reason:
            quarantine.append(quarantine_row(rows_by_number[source["row"]], Rejected("duplicate", reason)))
            duplicates.setdefault(index, set()).add(source["source_key"])
        else:
            kept.append((source, parts[index]["shard"]))

    explicit: dict[str, str] = {}
    for source, _ in kept:
        if source["split"]:
            explicit.setdefault(source["source_hash"], source["split"])
    index_rows = []
    for source, shard in kept:
        split = source["split"] or explicit.get(source["source_hash"]) or (
            "val" if _val_by_hash(source["source_hash"], cfg.split.val_fraction, cfg.split.seed) else "train")
        for clip in source["clips"]:
            index_rows.append({
                "row": source["row"], "clip_id": clip["clip_id"], "caption": source["caption"],
                "source": source["source"], "source_id": source["source_id"],
                "source_hash": source["source_hash"], "start": clip["start"], "end": clip["end"],
                "fps": cfg.clip.fps, "num_frames": cfg.clip.frames,
                "resolutions": [s.key for s in cfg.clip.sizes],
                "source_width": source["source_width"], "source_height": source["source_height"],
                "source_fps": source["source_fps"], "shard": shard, "tensor": source["source_key"],
                "frame_start": clip["frame_start"], "content_hash": clip["content_hash"], "split": split,
            })
    quarantine.sort(key=lambda q: q["row"])
    splits = Counter(r["split"] for r in index_rows)
    reasons = dict(sorted(Counter(q["reason"] for q in quarantine).items()))
    summary = CurationSummary(
        manifest=str(plan.manifest), out=str(plan.out), rows=len(plan.rows), kept_sources=len(kept),
        rejected_rows=len(quarantine), rejected_by_reason=reasons,
        clips=len(index_rows), clips_by_split={"train": splits.get("train", 0), "val": splits.get("val", 0)},
        frames=len(index_rows) * cfg.clip.frames,
        source_seconds=round(sum(s["span"][1] - s["span"][0] for s, _ in kept), 3),
        chunks_skipped=chunks_skipped)
    if not index_rows:  # refused: the published curation stays; the reasons go beside it
        plan.out.write_jsonl(f"{REFUSED}/{QUARANTINE}", quarantine)
        plan.out.write_json(f"{REFUSED}/{SUMMARY}", summary.to_dict())
        return summary
    publish(plan.out, {INDEX: atomic.jsonl_bytes(index_rows), INDEX_PARQUET: index_bytes(index_rows),
                       QUARANTINE: atomic.jsonl_bytes(quarantine), SUMMARY: atomic.json_bytes(summary.to_dict())})
    for name in plan.out.glob(f"{REFUSED}/*"):
        plan.out.remove(name)
    plan.out.prune(REFUSED)
    _drop_duplicate_frames(plan, parts, duplicates)  # after the index: it never lists a dropped source
    _remove_stale(plan, {p["shard"] for p in parts if p["shard"]})
    return summary


def publish(out: DataFolder, files: dict[str, bytes]) -> None:
    """Replace the published `files` (index, quarantine, summary) together.

    They are staged in OUT/publish/, then OUT/publish/COMMIT (the list of names) commits them, then each is moved
    into place. A kill before the commit leaves the previous files, and the next curation clears the staging; a
    kill after it leaves the move to the next curation (`finish_publication`), which completes it first."""
    for name, data in files.items():  # `curate` cleared what a killed run left here (`finish_publication`)
        out.write_bytes(f"{PUBLISH}/{name}", data)
    fault_point("curate.publish.before_commit")
    out.write_json(PUBLISH_COMMIT, sorted(files))
    fault_point("curate.publish.after_commit")
    finish_publication(out)


def finish_publication(out: DataFolder) -> bool:
    """Complete a committed publication a killed run left half-moved (True), or clear an uncommitted one."""
    committed = out.exists(PUBLISH_COMMIT)
    if committed:
        for name in out.read_json(PUBLISH_COMMIT):
            if out.exists(f"{PUBLISH}/{name}"):
                out.move(f"{PUBLISH}/{name}", name)
        out.remove(PUBLISH_COMMIT)
    for name in out.glob(f"{PUBLISH}/*"):  # an uncommitted staging: the previous files stand
        out.remove(name)
    out.prune(PUBLISH)
    return committed


def _remove_stale(plan: CurationPlan, live_shards: set[str]) -> None:
    """Drop parts/shards of chunks that no longer exist and shards no part refers to."""
    for part in plan.out.glob(f"{PARTS}/part-*.json"):
        if int(Path(part).stem.split("-")[1]) >= plan.chunk_count:
            plan.out.remove(part)
    for shard in plan.out.glob(f"{SHARDS}/shard-*.safetensors"):
        if shard not in live_shards:
            plan.out.remove(shard)
    for folder in (PARTS, SHARDS):
        plan.out.remove_stale_temporaries(folder)


class NothingKept(RuntimeError):
    """Every manifest row was rejected."""


ChunkRunner = Callable[[CurationPlan, list[int], bool], list[ChunkReport]]


def curate(manifest_path: Path | str, out: Path | str | DataFolder, params: Params, workers: int = 1,
           force: bool = False, on_row: Callable[[], None] | None = None,
           run_chunks: ChunkRunner | None = None, plan: CurationPlan | None = None) -> CurationSummary:
    """Curate a manifest into `out`. Resumable: chunks already done with the same inputs are skipped.

    `run_chunks(plan, indices, force)` lets an orchestrator (the Prefect flow, a Dask cluster) run the chunks as
    its own tasks; by default they run here, on `workers` threads. `plan`: the manifest's `plan_curation`, when the
    caller made it already (`on_row` is then called for the chunked rows only).
    """
    if plan is None:
        plan = plan_curation(manifest_path, out, params, on_row=None)
        for _ in plan.screened:
            on_row and on_row()

    def run(plan: CurationPlan, indices: list[int], again: bool) -> list[ChunkReport]:
        if run_chunks is not None:
            return run_chunks(plan, indices, again)
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(lambda i: run_chunk(plan.job(i), on_row, again), indices))
        return [run_chunk(plan.job(i), on_row, again) for i in indices]

    with plan.out.lock(plan.cache):
        finish_publication(plan.out)  # a run killed while it replaced the published files
        for folder in (PARTS, SHARDS, PUBLISH, REFUSED):
            plan.out.remove_stale_temporaries(folder)
        reports = run(plan, list(range(plan.chunk_count)), force)
        fault_point("curate.before_finalize")
        try:
            summary = finalize(plan, chunks_skipped=sum(r.skipped for r in reports))
        except FramesDropped as dropped:  # an earlier run's duplicates are kept now: their frames are needed again
            again = set(dropped.chunks)
            plan = plan.keeping_duplicates(dropped.chunks)
            run(plan, dropped.chunks, True)
            summary = finalize(plan, chunks_skipped=sum(r.skipped and r.index not in again for r in reports))
    if summary.clips == 0:
        previous = "the curation already there is unchanged" if plan.out.exists(INDEX) else "nothing was published"
        raise NothingKept(f"nothing valid remains: all {summary.rows} manifest rows of {plan.manifest} were "
                          f"rejected ({summary.rejected_by_reason}); see {plan.out.name(f'{REFUSED}/{QUARANTINE}')} "
                          f"({previous})")
    return summary
