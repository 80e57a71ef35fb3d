"""New data in: the rows of a manifest that a curated dataset does not hold yet, curated into it beside the clips it
has (`show1 ingest`, flows/ingest.py).

A dataset grown this way keeps a record of what it holds, published together with its index (so the two always
agree, show1/data/publication.py):

  OUT/ingested.json   the batches, one per ingest: the manifest's location and sha256, the folder its videos resolve
                      against, its first row number and row count; the curate settings; and the data version and
                      quarantine they were published with
  OUT/ingested.jsonl  every row held, in row order: its manifest fields and what screening found (as planned then)

Each ingest appends one batch: the manifest's rows the dataset does not hold (`row_key`: the same video location,
caption, id, time span and split), numbered after the held ones. Its curation plan is the held rows exactly as they
were planned (their files are not opened again) plus the new rows, screened now; a chunk never spans two batches
(`CurationPlan.batches`), so every earlier chunk's part file still commits its fingerprint: the chunk is skipped and
its shard is neither rewritten nor renamed. Near-duplicate search runs over every kept source in row order, as
always: a new row that repeats a held clip is quarantined as a duplicate, and no held clip can become one. Before
the new index is published the data contracts run on it (show1/data/contracts.py): a broken one publishes nothing,
and the dataset stays as it was.

A folder curated by `show1 curate` holds one batch: the manifest its summary.json names, planned again (it must
still give the part files there).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from show1 import atomic
from show1.config import Curate, Params
from show1.data.chunks import METHOD, read_part
from show1.data.curate import (
    INDEX,
    QUARANTINE,
    REFUSED,
    SUMMARY,
    ChunkRunner,
    NothingKept,
    curate,
    plan_rows,
)
from show1.data.errors import Rejected
from show1.data.folder import DataFolder
from show1.data.manifest import FIELDS, ManifestRow, read_manifest
from show1.data.sources import PACKAGE_SCHEME, is_url
from show1.provenance import file_digest

RECORD = "ingested.json"
ROWS = "ingested.jsonl"
FORMAT = 1
INGESTED = "show1.data.ingested"  # the Prefect event an ingest that adds clips emits
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")  # what show1.data.manifest reads


class IngestError(RuntimeError):
    """The dataset cannot take new rows as it is; the message says why and what to run."""


class ContractBroken(ValueError):
    """The index with the new rows breaks the data contracts; nothing was published."""


@dataclass(frozen=True)
class Batch:
    """The rows one ingest added (or `show1 curate` curated): from which manifest, resolved against which folder,
    and where they are numbered."""

    manifest: str
    sha256: str
    folder: Path
    first_row: int
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest, "sha256": self.sha256, "folder": str(self.folder),
                "first_row": self.first_row, "rows": self.rows}


@dataclass
class Holdings:
    """What a dataset holds: its batches and their rows (as read from their manifests), with what screening found."""

    batches: list[Batch] = field(default_factory=list)
    rows: list[ManifestRow] = field(default_factory=list)
    screened: dict[int, Rejected] = field(default_factory=dict)
    stamps: dict[int, list[int] | None] = field(default_factory=dict)
    state: tuple[str | None, str | None] = (None, None)  # the published (data version, quarantine sha256)

    def keys(self) -> set[bytes]:
        """A digest of each held row's `row_key`."""
        folders = {b.first_row: b.folder for b in self.batches}
        keys, folder = set(), None
        for row in self.rows:
            folder = folders.get(row.row, folder)
            keys.add(_digest_key(row_key(row, folder)))
        return keys


@dataclass
class IngestReport:
    """What an ingest did. `kept`, `quarantined` and `new_clips` count the new rows only."""

    data: str
    manifest: str
    manifest_sha256: str
    rows: int                      # the manifest's rows
    already_held: int              # of them, rows the dataset held before
    new_rows: int
    kept: int = 0                  # new rows whose clips are in the index
    quarantined: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    new_clips: int = 0
    clips: int | None = None       # in the dataset now (None: not counted, nothing was curated)
    previous_data_version: str | None = None
    data_version: str | None = None
    contracts: str | None = None   # the result.json of the contracts checked before publication
    nothing_kept: str | None = None  # why no new clip (None: some were kept)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def event(self) -> dict[str, Any]:
        """The `show1.data.ingested` event of this ingest: the dataset is the resource (its id stable per location),
        the new data version and the counts the payload."""
        return {
            "event": INGESTED,
            "resource": {"prefect.resource.id": dataset_resource_id(self.data), "prefect.resource.name": self.data,
                         "show1.data-version": self.data_version or ""},
            "payload": {"data_version": self.data_version, "previous_data_version": self.previous_data_version,
                        "data": self.data, "manifest": self.manifest, "manifest_sha256": self.manifest_sha256,
                        "rows": self.rows, "already_held": self.already_held, "new_rows": self.new_rows,
                        "kept": self.kept, "quarantined": self.quarantined,
                        "quarantined_by_reason": self.quarantined_by_reason, "new_clips": self.new_clips,
                        "clips": self.clips},
        }


def dataset_resource_id(data: str | Path) -> str:
    """The Prefect resource id of a dataset: `show1.dataset.` + a digest of where it is (a local folder's absolute
    path, or its URL), the same for every ingest into it."""
    folder = DataFolder(data)
    where = str(folder.local.resolve()) if folder.local else str(folder)
    return f"show1.dataset.{hashlib.sha256(where.encode()).hexdigest()[:16]}"


# ------------------------------------------------------------------------------------------------ rows held


def row_key(row: ManifestRow, folder: Path | None) -> str:
    """What makes two manifest rows the same: where the video is (a local path resolved against its manifest's
    folder), the caption, id, time span and split, and for a row unusable as written, why."""
    rejection = row.rejection and [row.rejection.reason, row.rejection.message]
    return json.dumps([_where(row.video, folder), row.caption, row.id, row.start, row.end, row.split, rejection],
                      ensure_ascii=False)


def _where(video: str | None, folder: Path | None) -> str | None:
    if not video or folder is None or is_url(video) or video.startswith(PACKAGE_SCHEME) or "://" in video:
        return video
    try:
        return os.path.normpath(os.path.join(folder, os.path.expanduser(video)))
    except (ValueError, RuntimeError):  # a path no file system can hold: the row is quarantined anyway
        return video


def _digest_key(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def settings_digest(cfg: Curate) -> str:
    """What curation's outputs depend on (every curate setting but where chunks run)."""
    shaping = {"method": METHOD, "settings": cfg.model_dump(mode="json", exclude={"executor"})}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()


def published_state(folder: DataFolder) -> tuple[str | None, str | None]:
    """The published (data version, quarantine sha256); (None, None) when nothing is published."""
    if not folder.exists(INDEX):
        return None, None
    from show1.provenance import data_version

    quarantine = folder.read_bytes(QUARANTINE) if folder.exists(QUARANTINE) else b""
    return data_version(folder), hashlib.sha256(quarantine).hexdigest()


def _rejection(value: Any) -> Rejected | None:
    return None if value is None else Rejected(value[0], value[1])


def _row_record(row: ManifestRow, screened: Rejected | None, stamp: list[int] | None) -> dict[str, Any]:
    return {"row": row.row, **{name: getattr(row, name) for name in FIELDS},
            "rejected": row.rejection and [row.rejection.reason, row.rejection.message],
            "screened": screened and [screened.reason, screened.message], "file": stamp}


def read_record(folder: DataFolder) -> dict[str, Any] | None:
    """The dataset's ingested.json when it describes the published index (a later `show1 curate` replaced the index
    without it: then None)."""
    try:
        record = folder.read_json(RECORD)
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return None
    if (record.get("data_version"), record.get("quarantine_sha256")) != published_state(folder):
        return None
    return record


def read_holdings(folder: DataFolder, params: Params) -> Holdings:
    """What `folder` holds: nothing (nothing published), its record of ingests, or the one manifest `show1 curate`
    curated it from."""
    state = published_state(folder)
    if state == (None, None):
        return Holdings()
    record = read_record(folder)
    if record is None:
        return _curated_batch(folder, params, state)
    if record.get("settings") != settings_digest(params.curate):
        raise IngestError(f"{folder} was curated with other curate settings than these params': ingest adds rows to "
                          "a dataset as it is; use the params it was curated with, or ingest into a new folder")
    holdings = Holdings(state=state, batches=[
        Batch(manifest=b["manifest"], sha256=b["sha256"], folder=Path(b["folder"]), first_row=b["first_row"],
              rows=b["rows"]) for b in record["batches"]])
    for number, item in enumerate(atomic.parse_jsonl(folder.read_text(ROWS), folder.name(ROWS))):
        if item.get("row") != number:
            raise IngestError(f"{folder.name(ROWS)}: row {number} is out of order; the record is damaged")
        holdings.rows.append(ManifestRow(row=number, rejection=_rejection(item["rejected"]),
                                         **{name: item[name] for name in FIELDS}))
        if item["screened"] is not None:
            holdings.screened[number] = _rejection(item["screened"])
        else:
            holdings.stamps[number] = item["file"]
    if len(holdings.rows) != sum(b.rows for b in holdings.batches):
        raise IngestError(f"{folder.name(ROWS)}: {len(holdings.rows)} rows, but {folder.name(RECORD)} lists "
                          f"{sum(b.rows for b in holdings.batches)}; the record is damaged")
    return holdings


def _curated_batch(folder: DataFolder, params: Params, state: tuple[str | None, str | None]) -> Holdings:
    """The holdings of a folder `show1 curate` made: its manifest's rows, planned again, as long as that plan is the
    one its part files commit (else ingesting would curate the earlier rows again)."""
    try:
        manifest = Path(folder.read_json(SUMMARY)["manifest"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        raise IngestError(f"{folder.name(SUMMARY)}: missing or damaged, so what {folder} holds is unknown; curate "
                          "it again (`show1 curate MANIFEST --out DATA`) before ingesting into it") from None
    if not manifest.is_file():
        raise IngestError(f"{folder} was curated from {manifest}, which is not there (from {Path.cwd()}): ingest "
                          "needs the rows the dataset holds; run it where that manifest is, or ingest into a new "
                          "folder")
    rows = read_manifest(manifest, params.curate.columns)
    batch = Batch(manifest=str(manifest), sha256=file_digest(manifest), folder=manifest.parent.resolve(),
                  first_row=0, rows=len(rows))
    plan = plan_rows(manifest, rows, folder, params, batches=((0, batch.folder),))
    for index in range(plan.chunk_count):
        if read_part(folder, plan.part_name(index), plan.fingerprint(index)) is None:
            raise IngestError(f"{folder} is not what {manifest} curates to with these params now (chunk {index} "
                              f"differs: other settings, or its files changed): run `show1 curate {manifest} --out "
                              f"{folder}` first, or ingest into a new folder")
    return Holdings(batches=[batch], rows=rows, screened=plan.screened, stamps=plan.stamps, state=state)


def ingested_manifests(data: str | Path) -> set[str]:
    """The sha256 of each manifest the dataset at `data` ingested (from its record; empty without one)."""
    record = read_record(DataFolder(data))
    return {b["sha256"] for b in record["batches"]} if record else set()


# -------------------------------------------------------------------------------------------------- manifests


def local_manifest(location: str | Path, cache: Path) -> Path:
    """A manifest's local file: the path itself, or for a URL (`s3://bucket/incoming/new.csv`, any fsspec URL) a
    copy in `cache`/manifests named by its content. The videos of a copied manifest must be URLs, `package://`
    paths or paths under `curate.allowed_roots`: a relative path resolves against the copy's folder."""
    text = str(location)
    if "://" not in text or text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    parent, _, name = text.rstrip("/").rpartition("/")
    data = DataFolder(parent).read_bytes(name)
    path = Path(cache) / "manifests" / hashlib.sha256(data).hexdigest()[:24] / name
    if not path.is_file():
        atomic.write_bytes(path, data)
    return path


def pending_manifests(location: str | Path, data: str | Path) -> list[str]:
    """The manifests directly in `location` (a folder or an fsspec URL; *.csv, *.tsv, *.jsonl, *.ndjson, hidden
    files left out) whose content the dataset at `data` has not ingested, in name order."""
    folder = DataFolder(location)
    if folder.local is not None and not folder.local.is_dir():
        raise FileNotFoundError(f"{folder.local}: no such folder to watch for manifests")
    held = ingested_manifests(data)
    names = [n for n in folder.glob("*") if "/" not in n and not n.startswith(".")
             and Path(n).suffix.lower() in MANIFEST_SUFFIXES]
    return [folder.name(n) for n in names if hashlib.sha256(folder.read_bytes(n)).hexdigest() not in held]


# ------------------------------------------------------------------------------------------------------ ingest


def ingest(manifest: str | Path, data: str | Path | DataFolder, params: Params, *, workers: int = 1,
           run_chunks: ChunkRunner | None = None, on_row: Callable[[], None] | None = None,
           validation: Path | None = None) -> IngestReport:
    """Curate the rows of `manifest` (a path or an fsspec URL) that the dataset at `data` does not hold yet into it,
    checking the data contracts on the result before it is published (their result goes to `validation`, default
    `paths.validation`). `run_chunks`, `workers`, `on_row`: as `show1.data.curate.curate` takes them.

    Raises ManifestError (an unreadable manifest), IngestError (a dataset that cannot take rows as it is),
    ContractBroken (nothing published), RuntimeError (another process curates the dataset)."""
    folder = DataFolder(data)
    where = str(folder.local.resolve()) if folder.local else str(folder)  # as the event names it
    source = local_manifest(manifest, params.paths.cache)
    rows = read_manifest(source, params.curate.columns)
    held = read_holdings(folder, params)
    batch_folder = source.parent.resolve()
    keys = held.keys()
    new = [r for r in rows if _digest_key(row_key(r, batch_folder)) not in keys]
    report = IngestReport(data=where, manifest=str(manifest) if "://" in str(manifest) else str(source.resolve()),
                          manifest_sha256=file_digest(source),
                          rows=len(rows), already_held=len(rows) - len(new), new_rows=len(new),
                          previous_data_version=held.state[0], data_version=held.state[0])
    first = len(held.rows)
    batch = Batch(manifest=report.manifest, sha256=report.manifest_sha256, folder=batch_folder, first_row=first,
                  rows=len(new))
    if not new:
        report.nothing_kept = f"nothing new: {folder} holds every one of the {len(rows)} rows of {manifest} already"
        _remember(folder, params, held, batch)
        return report

    added = [replace(row, row=first + number) for number, row in enumerate(new)]
    batches = [*held.batches, batch]
    plan = plan_rows(source, [*held.rows, *added], folder, params,
                     batches=tuple((b.first_row, b.folder) for b in batches), screened=held.screened,
                     stamps=held.stamps)

    def before_publish(files: dict[str, bytes]) -> dict[str, bytes]:
        """Under the dataset's lock: nobody published since we read it, the contracts hold, the record goes along."""
        if published_state(folder) != held.state:
            raise IngestError(f"{folder} changed while the new rows were curated (another curation published); "
                              "ingest again")
        version = hashlib.sha256(files[INDEX]).hexdigest()
        if version != held.state[0]:  # the same index as before: nothing new for the contracts to check
            report.contracts = str(_check_contracts(files[INDEX], params, validation or params.paths.validation))
        _count(report, files[INDEX], atomic.parse_jsonl(files[QUARANTINE].decode(), QUARANTINE), first)
        report.data_version = version
        state = (version, hashlib.sha256(files[QUARANTINE]).hexdigest())
        return {RECORD: _record_bytes(state, params, batches),
                ROWS: _rows_bytes([*held.rows, *added], plan.screened, plan.stamps)}

    try:
        curate(source, folder, params, workers=workers, run_chunks=run_chunks, on_row=on_row, plan=plan,
               before_publish=before_publish)
    except NothingKept:  # nothing was published before, and none of these rows is kept: nothing is published now
        refused = atomic.parse_jsonl(folder.read_text(f"{REFUSED}/{QUARANTINE}"), f"{REFUSED}/{QUARANTINE}")
        _count(report, b"", refused, first)
        report.nothing_kept = (f"nothing kept: all {len(new)} new rows were quarantined "
                               f"({_reasons(report)}); see {folder.name(f'{REFUSED}/{QUARANTINE}')} (nothing was "
                               "published)")
        return report
    if not report.kept:
        report.nothing_kept = (f"no new clip: all {len(new)} new rows were quarantined ({_reasons(report)}); see "
                               f"{folder.name(QUARANTINE)} (the data version is unchanged)")
    return report


def _record_bytes(state: tuple[str | None, str | None], params: Params, batches: list[Batch]) -> bytes:
    return atomic.json_bytes({"format": FORMAT, "data_version": state[0], "quarantine_sha256": state[1],
                              "settings": settings_digest(params.curate), "batches": [b.to_dict() for b in batches]})


def _rows_bytes(rows: list[ManifestRow], screened: dict[int, Rejected], stamps: dict[int, list[int] | None]) -> bytes:
    return atomic.jsonl_bytes(_row_record(row, screened.get(row.row), stamps.get(row.row)) for row in rows)


def _remember(folder: DataFolder, params: Params, held: Holdings, batch: Batch) -> None:
    """Record a manifest that added no row (as an empty batch), so that a watch does not take it up again. Only the
    record changes (ingested.json, one atomic write; the rows first when there was no record): the published files
    stay, so the record still describes them."""
    known = any(b.sha256 == batch.sha256 for b in held.batches)
    if held.state == (None, None) or (known and read_record(folder) is not None):
        return
    with folder.lock(params.paths.cache):
        if published_state(folder) != held.state:
            return  # published since: the next ingest of the manifest decides again
        if read_record(folder) is None:  # a folder `show1 curate` made: its rows go first
            folder.write_bytes(ROWS, _rows_bytes(held.rows, held.screened, held.stamps))
        folder.write_bytes(RECORD, _record_bytes(held.state, params, held.batches + ([] if known else [batch])))


def _count(report: IngestReport, index: bytes, quarantine: list[dict[str, Any]], first: int) -> None:
    """The new rows' outcomes (row numbers from `first`) and the dataset's clip count, into `report`."""
    kept, clips, new_clips = set(), 0, 0
    for line in index.splitlines():
        clips += 1
        row = json.loads(line)["row"]
        if row >= first:
            kept.add(row)
            new_clips += 1
    reasons = Counter(q["reason"] for q in quarantine if q["row"] >= first)
    report.kept, report.new_clips, report.clips = len(kept), new_clips, clips
    report.quarantined, report.quarantined_by_reason = sum(reasons.values()), dict(sorted(reasons.items()))


def _reasons(report: IngestReport) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in report.quarantined_by_reason.items())


def _check_contracts(index: bytes, params: Params, out_dir: Path) -> Path:
    """Run the clip and split contracts on the index about to be published; ContractBroken names what failed."""
    from show1.data.contracts import validate_data

    with tempfile.TemporaryDirectory(prefix="show1-ingest-") as staged:
        (Path(staged) / INDEX).write_bytes(index)
        report = validate_data(staged, params, out_dir)
    if not report.success:
        raise ContractBroken("the new rows break the data contracts (nothing was published):\n  "
                             + "\n  ".join(report.failed_expectations()) + f"\n  see {report.result_path}")
    return report.result_path

