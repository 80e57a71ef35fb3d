"""The curated index as a columnar file (`index.parquet`): what training processes open.

`index.jsonl` has one JSON object per clip; every process that read it built a Python dict per row (a synthetic
1 M-row index: 10.6 s and 3.3 GB per process). `index.parquet` holds the same rows as columns: a process reads only
the columns it needs, with the strings that repeat (shard names, splits, captions of a source's clips) dictionary
encoded, and picks a split as an array of row numbers. Nothing is built per row until a row is read.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

INDEX_PARQUET = "index.parquet"
INDEX_VIEW = "index.arrow"  # the training view: READ's columns, memory-mapped (`view_bytes`)
# What the index's shards hold, recorded in the file's schema: an index without it (or with another) was written by
# an earlier show1 whose shards held raw frames (see show1/data/shards.py).
CLIPS_FORMAT = "show1-clips-v2"

SCHEMA = pa.schema([
    ("row", pa.int64()), ("clip_id", pa.string()), ("caption", pa.string()), ("source", pa.string()),
    ("source_id", pa.string()), ("source_hash", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
    ("fps", pa.float64()), ("num_frames", pa.int32()), ("resolutions", pa.list_(pa.string())),
    ("source_width", pa.int32()), ("source_height", pa.int32()), ("source_fps", pa.float64()),
    ("shard", pa.string()), ("tensor", pa.string()), ("frame_start", pa.int32()), ("content_hash", pa.string()),
    ("split", pa.string()),
], metadata={"show1.clips": CLIPS_FORMAT})
# What a training or evaluation process holds of each clip (`resolutions`, the same for every clip, is read once).
READ = ("clip_id", "caption", "shard", "tensor", "frame_start", "num_frames", "split")
# Read as dictionaries: each distinct value is held once (a shard's name is shared by its clips, a source's tensor by
# the clips cut from it, a split by most of the index). Captions are not: a WebVid clip's caption is its own.
DICTIONARY = ("shard", "tensor", "split")
ROW_GROUP = 262_144


def index_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """`rows` (index.jsonl's, in order) as a table of the index's schema."""
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def view_bytes(table: pa.Table) -> bytes:
    """The training view of an index table: the columns a training process reads (`READ`), uncompressed, in the
    Arrow IPC file format, which a process memory-maps instead of decoding: opening it costs no copy, its pages are
    the page cache's (shared by every process of the machine that reads it) and only those a process touches become
    resident. Captions and clip ids as large strings (no 2 GB limit per column), the repeated names as dictionaries;
    the sizes, the same for every clip, in the schema's metadata."""
    sizes = table["resolutions"][0].as_py() if table.num_rows else []
    columns = {name: table[name].combine_chunks() for name in READ}
    for name in ("caption", "clip_id"):
        columns[name] = columns[name].cast(pa.large_string())
    for name in DICTIONARY:
        columns[name] = columns[name].dictionary_encode()
    view = pa.table(columns).replace_schema_metadata({"show1.clips": CLIPS_FORMAT, "show1.sizes": json.dumps(sizes)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, view.schema) as writer:
        writer.write_table(view, max_chunksize=max(1, view.num_rows))
    return sink.getvalue().to_pybytes()


def index_bytes(table: pa.Table, view_sha256: str | None = None) -> bytes:
    """An index table as a Parquet file, the same bytes for the same rows with one pyarrow; `view_sha256` (the
    training view's hash, checked when a copy of the view is fetched) goes in its metadata."""
    if view_sha256:
        table = table.replace_schema_metadata(table.schema.metadata | {b"show1.view_sha256": view_sha256.encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP, compression="zstd", use_dictionary=True,
                   write_page_checksum=True)  # a damaged copy fails `verify_index`
    return buffer.getvalue()


def verify_index(path: Path | str) -> None:
    """Raise ValueError unless `path` is a whole index of this show1's format: every page read back against its
    checksum (a copy fetched into a data cache is checked before training opens it)."""
    path = Path(path)
    parquet = open_index(path.parent, path)
    try:
        for group in range(parquet.num_row_groups):
            parquet.read_row_group(group)  # the pages' CRCs are checked as they are read
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: damaged index ({exc})") from None


class IndexMissing(FileNotFoundError):
    """A curated folder without `index.parquet`: not curated, or curated by an earlier show1."""


def index_path(root: Path | str) -> Path:
    """`root/index.parquet`, or `IndexMissing` saying what to run."""
    root = Path(root)
    path = root / INDEX_PARQUET
    if not path.is_file():
        again = f"show1 curate MANIFEST --out {root}"
        if (root / "index.jsonl").is_file():
            raise IndexMissing(f"{path} not found: {root} was curated by an earlier show1 (index.jsonl only); "
                               f"run `{again}` once more (its chunks are reused, only the index is written)")
        raise IndexMissing(f"{path} not found: run `{again}` first")
    return path


class IndexOutdated(ValueError):
    """An index written by an earlier show1, whose shards this one cannot read."""


def open_index(root: Path | str, path: Path | None = None, **options: Any) -> pq.ParquetFile:
    """`root/index.parquet` (or its local copy `path`) opened (`options` go to `pq.ParquetFile`), or a one-line error
    saying what to run."""
    path = path or index_path(root)
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True, **options)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet index ({exc}); curate the folder again") from None
    found = (parquet.schema_arrow.metadata or {}).get(b"show1.clips", b"").decode()
    if found != CLIPS_FORMAT:
        raise IndexOutdated(f"{path}: curated by an earlier show1 (shards of raw frames, ~20 MB per paper clip); run "
                            f"`show1 curate MANIFEST --out {root}` again: the clips are stored compressed now")
    return parquet


def curated_sizes(root: Path | str, path: Path | None = None) -> list[str]:
    """The sizes the clips of `root` were curated at (every clip has the same), read from the first clip only; []
    when there is none. `path`: the index's local copy, for a folder at a URL (`CuratedFiles.index`)."""
    parquet = open_index(root, path)
    try:
        return _first_sizes(parquet)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path or index_path(root)}: not a readable Parquet index ({exc}); curate the "
                         "folder again") from None


def _first_sizes(parquet: pq.ParquetFile) -> list[str]:
    if not parquet.metadata.num_rows:
        return []
    return list(parquet.read_row_group(0, columns=["resolutions"])["resolutions"][0].as_py())


class ClipIndex:
    """The clips of a curated folder, columnar; `split` "train", "val" or None for both."""

    def __init__(self, root: Path | str, split: str | None = None, path: Path | None = None,
                 view: Path | None = None):
        """`path`, `view`: local copies of the index and its training view, for a folder at a URL (`CuratedFiles`).
        The training view is memory-mapped when there is one (`view_bytes`), else the index is read."""
        self.root = root
        if split not in (None, "train", "val"):
            raise ValueError(f"split must be 'train', 'val' or None, got {split!r}")
        open_index(root, path)  # there, readable, and of this show1's format (its footer only)
        if view is None and path is None and (Path(root) / INDEX_VIEW).is_file():
            view = Path(root) / INDEX_VIEW
        self.mapped: pa.MemoryMappedFile | None = None  # the training view's mapping, when the view is read
        if view is not None:
            self.mapped = pa.memory_map(str(view))
            self.table, self._resolutions = _open_view(root, view, self.mapped)
        else:
            self.table, self._resolutions = _read_index(root, path)
        self.positions = np.arange(self.table.num_rows) if split is None else _rows_equal(self.table["split"], split)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def resolutions(self) -> list[str]:
        """The sizes the clips were curated at (every clip has the same), or [] for an empty index."""
        return list(self._resolutions)

    def row(self, index: int) -> dict[str, Any]:
        """The `index`-th clip of the split: its fields in `READ`."""
        position = int(self.positions[index])
        return {name: self.table[name][position].as_py() for name in READ} | {"resolutions": self.resolutions}

    def shard(self, index: int) -> str:
        """The shard the `index`-th clip of the split is read from (its other fields are not built)."""
        return self.table["shard"][int(self.positions[index])].as_py()

    def shard_numbers(self) -> np.ndarray:
        """A number per clip of the split naming its shard (the same number for clips of one shard)."""
        column = self.table["shard"].unify_dictionaries()
        if not column.num_chunks:
            return np.empty(0, dtype=np.int64)
        codes = np.concatenate([chunk.indices.to_numpy(zero_copy_only=False) for chunk in column.chunks])
        return codes[self.positions].astype(np.int64)

    def captions(self) -> list[str]:
        """Every distinct caption of the split, in the order of their first clip."""
        chosen = self.table["caption"].take(pa.array(self.positions))
        return pc.unique(chosen.cast(pa.string())).to_pylist()


def _open_view(root: Path | str, view: Path, mapped: pa.MemoryMappedFile) -> tuple[pa.Table, list[str]]:
    """The training view, read from its memory mapping: no column is copied or decoded."""
    try:
        reader = pa.ipc.open_file(mapped)
        metadata = reader.schema.metadata or {}
        table = reader.read_all()
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{view}: not a readable training view ({exc}); curate the folder again") from None
    if metadata.get(b"show1.clips", b"").decode() != CLIPS_FORMAT:
        raise IndexOutdated(f"{view}: curated by an earlier show1; run `show1 curate MANIFEST --out {root}` again")
    return table, json.loads(metadata.get(b"show1.sizes", b"[]"))


def _read_index(root: Path | str, path: Path | None) -> tuple[pa.Table, list[str]]:
    """The columns training reads, from the Parquet index (a folder without a training view)."""
    parquet = open_index(root, path, memory_map=True, read_dictionary=list(DICTIONARY))
    path = path or index_path(root)
    try:
        # One row group at a time, on this thread: the peak is the table plus one group's decoding.
        groups = [parquet.read_row_group(i, columns=list(READ), use_threads=False)
                  for i in range(parquet.num_row_groups)]
        table = pa.concat_tables(groups) if groups else SCHEMA.empty_table().select(list(READ))
        return table, _first_sizes(parquet)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet index ({exc}); curate the folder again") from None


def _rows_equal(column: pa.ChunkedArray, value: str) -> np.ndarray:
    """The row numbers where a dictionary-encoded `column` holds `value`, compared as dictionary codes (no string is
    built per row)."""
    found, offset = [], 0
    for chunk in column.chunks:
        matches = pc.index(chunk.dictionary, value).as_py()
        if matches >= 0:
            found.append(np.flatnonzero(chunk.indices.to_numpy(zero_copy_only=False) == matches) + offset)
        offset += len(chunk)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)
