"""Atomic writes: a killed process leaves either the old file or the new one, never half of one.

A write that runs out of room (a full disk, a quota, the file size limit) leaves the same: its temporary is removed,
and it raises `DiskFull` naming the file or folder it was writing (`disk_full_message` says what to do).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

TMP_MARK = ".tmp-"
# Running out of room: no space left on the device, the disk quota, or the file size limit (RLIMIT_FSIZE, where
# SIGXFSZ is ignored).
DISK_FULL = {errno.ENOSPC: ("no space left on device", "free space"),
             errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
             errno.EFBIG: ("file size limit exceeded", "raise the file size limit (ulimit -f)")}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' writer reports the OS error behind it


class DiskFull(OSError):
    """A write that ran out of room. `filename` is the file or folder being written (never its temporary)."""


def disk_full_errno(exc: BaseException) -> int | None:
    """The errno (one of DISK_FULL) when `exc`, or an exception it was raised from, is a write that ran out of room:
    an OSError, or a library's error that reports one in its message (safetensors: `… (os error 28)`)."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError):
            if current.errno in DISK_FULL:
                return current.errno
        else:
            found = _RUST_OS_ERROR.search(str(current))
            if found and int(found.group(1)) in DISK_FULL:
                return int(found.group(1))
        current = current.__cause__  # `raise … from` only: an error met while cleaning up is not its cause
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is a write that ran out of room (see `disk_full_errno`)."""
    return disk_full_errno(exc) is not None


def disk_full_message(exc: BaseException, again: str) -> str:
    """One line for a write that ran out of room: what ran out, what was being written, and the fix, e.g.
    `no space left on device writing OUT/shards/shard-00005-….safetensors: free space and run the same command
    again` (`again`: what to run once there is room)."""
    code = disk_full_errno(exc) or errno.ENOSPC
    what, remedy = DISK_FULL[code]
    where = f" writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    return f"{what}{where}: {remedy} and {again}"


@contextlib.contextmanager
def writing(target: Path | str) -> Iterator[None]:
    """Raise a write that runs out of room in the block as `DiskFull` naming `target` (the outermost `writing`
    names it: the folder being written rather than a file of its staging folder)."""
    try:
        yield
    except Exception as exc:
        code = disk_full_errno(exc)
        if code is None:
            raise
        raise DiskFull(code, os.strerror(code), str(target)) from exc


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
    with writing(target), temporary_in(target.parent, target.name) as tmp:
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


def append(handle: BinaryIO, data: bytes, path: Path | str) -> None:
    """Append `data` to the file open unbuffered (`open(path, "ab", buffering=0)`) as `handle`, whole or not at all:
    a write that fails part-way (the disk filled up) is cut back off, so the file never ends in half a line."""
    size = os.lseek(handle.fileno(), 0, os.SEEK_END)
    with writing(path):
        try:
            view = memoryview(data)
            while view:
                view = view[handle.write(view):]
        except BaseException:
            os.ftruncate(handle.fileno(), size)
            raise


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
    with writing(target):
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
