"""Atomic writes: a killed process leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def temporary_in(folder: Path | str, name: str = "") -> Iterator[Path]:
    """Yield a fresh temporary file path in `folder`, removed on exit unless it was renamed away."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_MARK}{name}.", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would leave published files unreadable to others
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def publish(tmp: Path, target: Path) -> None:
    """fsync `tmp` and rename it over `target` (same folder, so the rename is atomic)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success fsync it and rename it over `target`."""
    target = Path(target)
    with temporary_in(target.parent, target.name) as tmp:
        yield tmp
        publish(tmp, target)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the filesystem allows it)."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(target: Path | str, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path | str, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """How show1 writes a JSON file: indented, keys sorted, UTF-8, a final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    """How show1 writes JSON lines: one object per line, keys sorted, UTF-8."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def write_json(target: Path | str, obj: Any) -> None:
    write_bytes(target, json_bytes(obj))


def write_jsonl(target: Path | str, rows: Iterable[dict[str, Any]]) -> None:
    write_bytes(target, jsonl_bytes(rows))


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Read a JSONL file; a line that does not parse is an error naming the file and line."""
    with open(path, encoding="utf-8") as handle:
        return parse_jsonl(handle, path)


def parse_jsonl(lines: Iterable[str] | str, name: Path | str) -> list[dict[str, Any]]:
    """Parse JSON lines (an iterable of lines, or one text); a line that does not parse is an error naming
    `name` and the line."""
    rows = []
    # split on "\n" only, as a file iterates: str.splitlines would also cut at U+2028 inside a JSON string
    for number, line in enumerate(lines.split("\n") if isinstance(lines, str) else lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}:{number}: not valid JSON ({exc.msg})") from None
    return rows


def staging_folder(target: Path | str) -> Path:
    """A fresh, empty folder beside `target` (same filesystem, so it can be renamed onto it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent))


def replace_folder(staging: Path, target: Path) -> None:
    """Put the finished `staging` folder in place of `target`. The old folder is moved aside first and removed
    only once the new one is in place, so a kill at any point leaves the old folder or the new one (plus, at
    worst, a hidden leftover that `remove_stale_folders` clears)."""
    target = Path(target)
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}old-", dir=target.parent))
        aside.rmdir()
        target.rename(aside)
        staging.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        staging.rename(target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def folder_in_place(target: Path | str) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an error it replaces `target` whole.
    On an error (or a kill) `target` is untouched."""
    target = Path(target)
    staging = staging_folder(target)
    try:
        yield staging
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_folders(folder: Path) -> int:
    """Delete staging folders a killed writer left in `folder` (see `folder_in_place`); returns how many."""
    count = 0
    if Path(folder).is_dir():
        for leftover in Path(folder).glob(f".*{TMP_MARK}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
                count += 1
    return count


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporaries a killed writer left in `folder`; returns how many."""
    count = 0
    if folder.is_dir():
        for leftover in folder.glob(f"{TMP_MARK}*"):
            leftover.unlink(missing_ok=True)
            count += 1
    return count
