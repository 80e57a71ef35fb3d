"""Curation: manifest rows → filtered, clipped, resized sources in shards, plus index and quarantine.

The work is split into chunks of `curate.rows_per_shard` consecutive manifest rows. Each chunk is
processed independently (in any order, in parallel) into one shard and one part file; the part file is
written last and is the commit marker, so a killed run leaves no half-written shard and a rerun skips
the chunks already done. `finalize` then assembles, in manifest order, the outputs other tools read:

  OUT/index.jsonl       one row per kept clip
  OUT/index.parquet     the same rows as columns (show1/data/clip_index.py)
  OUT/index.arrow       the columns training reads, memory-mapped (the training view)
  OUT/quarantine.jsonl  one row per rejected manifest row, with `reason` and `error`
  OUT/summary.json      counts (also the DVC metrics of the curate stage)
  OUT/version.json      the data version: the sha256 of index.jsonl (show1.provenance.data_version)
  OUT/shards/, OUT/parts/

A curation never damages the one it replaces. Shards are named by their chunk's fingerprint, so a new run writes
beside the shards the published index reads; the index, quarantine and summary are replaced together (staged in
OUT/publish/, committed by one marker file: `publish`) and only when the run keeps something; only then are the
shards and part files no longer needed removed. A run that fails, is refused (nothing kept: its quarantine and
summary go to OUT/refused/) or is killed at any point leaves the published curation as it was.

OUT is a local folder or any fsspec URL (`s3://bucket/prefix`): every file goes through `DataFolder`.

This module plans a run (`plan_curation`), runs its chunks and finalizes it (`curate`, `finalize`). What happens to
one chunk is in show1/data/chunks.py, to one row in show1/data/source_row.py, and the publication's commit protocol
in show1/data/publication.py. `show1 ingest` (show1/data/ingest.py) adds rows to a published curation as a new batch
(`CurationPlan.batches`), leaving the chunks of the earlier ones as they are.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from show1 import atomic
from show1.config import Curate, Params
from show1.data import captions, dedupe, manifest, shards, sources
from show1.data.chunks import (
    METHOD,
    PARTS,
    SHARDS,
    ChunkJob,
    ChunkReport,
    part_name,
    quarantine_row,
    read_part,
    run_chunk,
    source_frames,
)
from show1.data.clip_index import INDEX_PARQUET, INDEX_VIEW, index_bytes, index_table, view_bytes
from show1.data.errors import Rejected
from show1.data.folder import DataFolder
from show1.data.manifest import ManifestRow
from show1.data.publication import PUBLISH, finish_publication, publish
from show1.data.source_row import source_id_for
from show1.faults import fault_point

INDEX = "index.jsonl"
QUARANTINE = "quarantine.jsonl"
SUMMARY = "summary.json"
VERSION = "version.json"  # the data version (the sha256 of index.jsonl), read without reading the index
REFUSED = "refused"                 # the quarantine and summary of a run that kept nothing (nothing else changes)
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
    # The batches of a dataset grown by `show1 ingest` (show1/data/ingest.py), in row order: each one's first row and
    # the folder its videos resolve against. A chunk never holds rows of two batches, so rows added as a new batch
    # leave the chunks of the earlier ones (their part files and shards) as they were. Empty: one batch, the manifest.
    batches: tuple[tuple[int, Path], ...] = ()

    @cached_property
    def chunked(self) -> tuple[ManifestRow, ...]:
        """The rows chunks curate: every row not screened, in manifest order."""
        return tuple(r for r in self.rows if r.row not in self.screened)

    @cached_property
    def spans(self) -> tuple[tuple[int, int, Path], ...]:
        """Each chunk as (start, stop) in `chunked` and the folder its videos resolve against: `rows_per_chunk`
        consecutive rows of one batch."""
        batches = self.batches or ((0, self.manifest.parent),)
        spans: list[tuple[int, int, Path]] = []
        begin = 0
        for number, (_, folder) in enumerate(batches):
            stop = len(self.chunked) if number + 1 == len(batches) else \
                bisect.bisect_left(self.chunked, batches[number + 1][0], lo=begin, key=lambda r: r.row)
            spans += [(start, min(start + self.rows_per_chunk, stop), folder)
                      for start in range(begin, stop, self.rows_per_chunk)]
            begin = stop
        return tuple(spans)

    @property
    def chunk_count(self) -> int:
        return len(self.spans)

    def chunk(self, index: int) -> tuple[ManifestRow, ...]:
        start, stop, _ = self.spans[index]
        return self.chunked[start:stop]

    def manifest_dir(self, index: int) -> Path:
        """The folder the videos of chunk `index` resolve against: its batch's manifest's."""
        return self.spans[index][2]

    @cached_property
    def fingerprints(self) -> tuple[str, ...]:
        """Per chunk: changes whenever the chunk's rows, their files or a setting that shapes the output do."""
        settings = self.settings.model_dump(mode="json", exclude={"split", "rows_per_shard", "executor"})
        resolved: dict[Path, str] = {}
        prints = []
        for index in range(self.chunk_count):
            manifest_dir = self.manifest_dir(index)
            if manifest_dir not in resolved:
                resolved[manifest_dir] = str(manifest_dir.resolve())
            payload = {
                "method": METHOD,
                "settings": settings,
                "manifest_dir": resolved[manifest_dir],
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
                        manifest_dir=self.manifest_dir(index), cache=self.cache, settings=self.settings,
                        source_ids={r.row: self.source_ids[r.row] for r in rows if r.row in self.source_ids},
                        drop_duplicates=index not in self.keep_duplicates)

    def keeping_duplicates(self, chunks: list[int]) -> CurationPlan:
        """This plan, with `chunks` storing the frames of every kept source (see `keep_duplicates`)."""
        again = replace(self, keep_duplicates=self.keep_duplicates | set(chunks))
        for computed in ("fingerprints", "chunked", "spans"):  # the run's own, not computed again for every row
            if computed in self.__dict__:
                again.__dict__[computed] = self.__dict__[computed]
        return again


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


def reject_repeated_ids(rows: Sequence[ManifestRow]) -> list[ManifestRow]:
    """`rows` with every use of an id after its first rejected (`duplicate_id`)."""
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
    return checked


def plan_curation(manifest_path: Path | str, out: Path | str | DataFolder, params: Params,
                  on_row: Callable[[], None] | None = None) -> CurationPlan:
    """Read the manifest, mark the rows that are rejected before any IO (bad fields, repeated ids), and screen the
    others (`screen`); `on_row` is called once per row screened."""
    manifest_path = Path(manifest_path)
    return plan_rows(manifest_path, manifest.read_manifest(manifest_path, params.curate.columns), out, params, on_row)


def plan_rows(manifest_path: Path, rows: Sequence[ManifestRow], out: Path | str | DataFolder, params: Params,
              on_row: Callable[[], None] | None = None, batches: tuple[tuple[int, Path], ...] = (),
              screened: dict[int, Rejected] | None = None,
              stamps: dict[int, list[int] | None] | None = None) -> CurationPlan:
    """`plan_curation` of rows already read, in row order. `batches`: see `CurationPlan.batches`. `screened` and
    `stamps`: what screening found for rows planned before (a dataset's held rows), which are not screened again."""
    checked = reject_repeated_ids(rows)
    usable = [r for r in checked if r.rejection is None]
    screened, stamps = dict(screened or {}), dict(stamps or {})
    firsts = [first for first, _ in batches]
    located: dict[Path, dict[str, Rejected | list[int] | None]] = {}
    for row in checked:
        if row.row in screened or row.row in stamps:
            continue
        folder = batches[bisect.bisect_right(firsts, row.row) - 1][1] if batches else manifest_path.parent
        outcome = screen(row, folder, params.curate, located.setdefault(folder, {}))
        if isinstance(outcome, Rejected):
            screened[row.row] = outcome
        else:
            stamps[row.row] = outcome
        if on_row:
            on_row()
    return CurationPlan(manifest=manifest_path, out=DataFolder(out), cache=params.paths.cache,
                        settings=params.curate, rows=tuple(checked), rows_per_chunk=params.curate.rows_per_shard,
                        source_ids=assign_source_ids(usable), screened=screened, stamps=stamps, batches=batches)


# --------------------------------------------------------------------------------------------- finalize


@dataclass
class CurationSummary:
    """What a curation run produced; written as OUT/summary.json (`metrics()`: the curate stage's DVC metrics)."""

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

    def metrics(self) -> dict[str, Any]:
        """The numbers alone, for a DVC metrics file: the manifest and output paths stay in OUT/summary.json."""
        return {k: v for k, v in self.to_dict().items() if k not in ("manifest", "out")}


def _val_by_hash(source_hash: str, fraction: float, seed: int) -> bool:
    value = int(hashlib.sha256(f"{seed}:{source_hash}".encode()).hexdigest()[:15], 16)
    return value / 16**15 < fraction


class FramesDropped(RuntimeError):
    """Kept sources whose frames an earlier finalize dropped from their shards (they were duplicates then)."""

    def __init__(self, chunks: list[int]) -> None:
        super().__init__(f"chunks {chunks} must be curated again: a source now kept was dropped as a duplicate")
        self.chunks = chunks


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


# Called with the files a curation is about to publish (name -> bytes); returns more files to publish with them, or
# raises to publish nothing (`show1 ingest`: its record of the rows held, after the data contracts pass).
BeforePublish = Callable[[dict[str, bytes]], dict[str, bytes]]


def finalize(plan: CurationPlan, chunks_skipped: int = 0,
             before_publish: BeforePublish | None = None) -> CurationSummary:
    """Assemble index, quarantine and summary from the part files, in manifest order.

    Near-duplicate search runs here, over every kept source at once (`dedupe`), so its result does not depend on
    how or where chunks ran; the frames of the duplicates it rejects leave the shards. `before_publish`: see
    `BeforePublish`.
    """
    parts = []
    for index in range(plan.chunk_count):
        part = read_part(plan.out, plan.part_name(index), plan.fingerprint(index))
        if part is None:
            raise RuntimeError(f"chunk {index} of {plan.out} is not curated yet; run the curation again")
        parts.append(part)
    cfg = plan.settings
    listed = [(index, source) for index, part in enumerate(parts) for source in part["sources"]]
    reasons = dedupe.find_duplicates([source_frames(source) for _, source in listed],
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
    index, table = atomic.jsonl_bytes(index_rows), index_table(index_rows)
    view = view_bytes(table)
    files = {INDEX: index, INDEX_PARQUET: index_bytes(table, hashlib.sha256(view).hexdigest()), INDEX_VIEW: view,
             VERSION: atomic.json_bytes({"data_version": hashlib.sha256(index).hexdigest()}),
             QUARANTINE: atomic.jsonl_bytes(quarantine), SUMMARY: atomic.json_bytes(summary.to_dict())}
    if before_publish is not None:
        files |= before_publish(files)
    publish(plan.out, files)
    for name in plan.out.glob(f"{REFUSED}/*"):
        plan.out.remove(name)
    plan.out.prune(REFUSED)
    _drop_duplicate_frames(plan, parts, duplicates)  # after the index: it never lists a dropped source
    _remove_stale(plan, {p["shard"] for p in parts if p["shard"]})
    return summary


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
           run_chunks: ChunkRunner | None = None, plan: CurationPlan | None = None,
           before_publish: BeforePublish | None = None) -> CurationSummary:
    """Curate a manifest into `out`. Resumable: chunks already done with the same inputs are skipped.

    `run_chunks(plan, indices, force)` lets an orchestrator (the Prefect flow, a Dask cluster) run the chunks as
    its own tasks; by default they run here, on `workers` threads. `plan`: the manifest's `plan_curation`, when the
    caller made it already (`on_row` is then called for the chunked rows only). `before_publish`: see
    `BeforePublish`.
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
            summary = finalize(plan, chunks_skipped=sum(r.skipped for r in reports), before_publish=before_publish)
        except FramesDropped as dropped:  # an earlier run's duplicates are kept now: their frames are needed again
            again = set(dropped.chunks)
            plan = plan.keeping_duplicates(dropped.chunks)
            run(plan, dropped.chunks, True)
            summary = finalize(plan, chunks_skipped=sum(r.skipped and r.index not in again for r in reports),
                               before_publish=before_publish)
    if summary.clips == 0:
        previous = "the curation already there is unchanged" if plan.out.exists(INDEX) else "nothing was published"
        raise NothingKept(f"nothing valid remains: all {summary.rows} manifest rows of {plan.manifest} were "
                          f"rejected ({summary.rejected_by_reason}); see {plan.out.name(f'{REFUSED}/{QUARANTINE}')} "
                          f"({previous})")
    return summary
