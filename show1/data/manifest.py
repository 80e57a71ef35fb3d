"""Reading manifests (CSV or JSONL) into rows, with column names mapped by `curate.columns`."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from show1.config import Columns
from show1.data.errors import ManifestError, Rejected
from show1.inputs import shown

FIELDS = ("video", "caption", "id", "start", "end", "split")
REQUIRED = ("video", "caption")
SPLITS = ("train", "val")
csv.field_size_limit(16 * 1024 * 1024)
_UNENCODABLE = re.compile(r"[\x00\ud800-\udfff]")
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class ManifestRow:
    """One data row of a manifest. `row` is its 0-based index among the data rows."""

    row: int
    video: str | None = None
    caption: str | None = None
    id: str | None = None
    start: float | None = None
    end: float | None = None
    split: str | None = None
    # Set when the row itself is unusable (parse error, bad span, …); it then goes straight to quarantine.
    rejection: Rejected | None = field(default=None, compare=False)

    def fingerprint_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("row", *FIELDS)}


def manifest_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise ManifestError(f"{path}: unknown manifest format '{suffix}' (use .csv, .tsv or .jsonl)")


def read_manifest(path: Path | str, columns: Columns = Columns()) -> list[ManifestRow]:
    """Read every data row of a manifest; row-level problems are carried on the row, not raised."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    kind = manifest_format(path)
    # Undecodable bytes become U+FFFD so a binary caption is one bad row, not a crashed run.
    text = path.read_bytes().decode("utf-8-sig", errors="replace").replace("\x00", "\ufffd")
    records = _csv_records(text, path, delimiter="\t" if kind == "tsv" else ",") if kind != "jsonl" \
        else _jsonl_records(text)
    rows = [_to_row(i, rec, columns) for i, rec in enumerate(records)]
    if not rows:
        raise ManifestError(f"{path}: the manifest has no data rows")
    dicts = [r for r in records if isinstance(r, dict)]
    for name in REQUIRED:
        candidates = getattr(columns, name)
        if not any(c in d for d in dicts for c in candidates):
            present = sorted({k for d in dicts for k in d})  # quoted and escaped: a name may hold a line break
            raise ManifestError(
                f"{path}: no '{name}' column (looked for {', '.join(candidates)}; found "
                f"{', '.join(shown(str(k)) for k in present)}). "
                f"Rename the column or map it in params.yaml under curate.columns.{name}.")
    return rows


def _csv_records(text: str, path: Path, delimiter: str) -> list[Any]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise ManifestError(f"{path}: the manifest is empty") from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise ManifestError(f"{path}: repeated column names in the header: {header}")
    records: list[Any] = []
    try:
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank line: not a data row
            if len(values) > len(header):
                records.append(ValueError(f"{len(values)} fields for {len(header)} columns"))
                continue
            records.append(dict(zip(header, values, strict=False)))
    except csv.Error as exc:
        raise ManifestError(f"{path}: line {reader.line_num}: {exc}") from None
    return records


def _jsonl_records(text: str) -> list[Any]:
    records: list[Any] = []
    # Lines end at \n, \r\n or \r only: str.splitlines() also splits at U+0085, U+2028 and U+2029, which a JSON
    # string may hold unescaped (a caption scraped from the web), and made one good row two malformed ones.
    for line in _LINE_END.split(text):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(ValueError(f"not valid JSON: {exc.msg}"))
            continue
        except RecursionError:
            records.append(ValueError("not usable JSON: nested too deeply"))
            continue
        records.append({_utf8(k): _utf8(v) for k, v in value.items()} if isinstance(value, dict) else ValueError(
            f"a JSONL row must be an object, got {type(value).__name__}"))
    return records


def _utf8(value: Any) -> Any:
    """A JSON string as the same text written raw would read: a NUL or a lone surrogate (the escapes `\\u0000`,
    `\\udc80`) becomes U+FFFD, as undecodable bytes do, so every field can be written back as UTF-8."""
    return _UNENCODABLE.sub("\ufffd", value) if isinstance(value, str) else value


def _pick(record: dict[str, Any], names: Iterable[str]) -> Any:
    for name in names:
        if name in record:
            return record[name]
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _seconds(value: Any, name: str) -> float | None:
    text = _text(value)
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise Rejected("bad_time_span", f"{name}={text!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise Rejected("bad_time_span", f"{name}={text!r} must be a finite number >= 0")
    return seconds


def _to_row(index: int, record: Any, columns: Columns) -> ManifestRow:
    if isinstance(record, Exception):
        return ManifestRow(row=index, rejection=Rejected("malformed_row", str(record)))
    values = {name: _pick(record, getattr(columns, name)) for name in FIELDS}
    video, caption = _text(values["video"]), values["caption"]
    caption = None if caption is None else (caption if isinstance(caption, str) else str(caption))
    ident = _text(values["id"])
    split = _text(values["split"])
    try:
        start, end = _seconds(values["start"], "start"), _seconds(values["end"], "end")
        if start is not None and end is not None and end <= start:
            raise Rejected("bad_time_span", f"end ({end}) must be after start ({start})")
        if split is not None and split.strip().lower() not in SPLITS:
            raise Rejected("bad_split", f"split={split!r} is not one of {', '.join(SPLITS)}")
    except Rejected as rejection:
        return ManifestRow(row=index, video=video, caption=caption, id=ident, rejection=rejection)
    return ManifestRow(
        row=index, video=video.strip() if video else None, caption=caption,
        id=ident.strip() if ident else None, start=start, end=end,
        split=split.strip().lower() if split else None)
