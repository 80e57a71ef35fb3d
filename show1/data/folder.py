"""A curated dataset's folder: a local path or any fsspec URL (`s3://bucket/prefix`, `gs://…`, `file:///…`).

Curation writes its shards, part files, index, quarantine and summary through `DataFolder`, so Dask workers on
other machines can write to one object store. What each kind of store promises:

- **Local** (a path, or a `file://` URL): every file is written to a temporary beside it, fsynced and renamed
  over the target (`show1.atomic`), so a kill leaves the old file or the new one; `lock()` is an flock on
  `FOLDER/.lock`, so a second curation of the folder fails fast.
- **Object store** (anything else fsspec opens): each file is one upload, and an object store makes an object
  visible whole or not at all, so no temporaries are needed. There is no lock across machines: `lock()` holds
  a local flock keyed by the URL (in `cache`), which stops a second curation started on the same machine only.
  Credentials and endpoints come from the environment as each filesystem reads them (for S3: `AWS_PROFILE` or
  `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for an S3-compatible store).

A `DataFolder` pickles as its URL, so a Dask task carries it to a worker that opens the store itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from show1 import atomic

LOCK = ".lock"


class FolderUnavailable(RuntimeError):
    """The folder's URL names a filesystem fsspec cannot open here (unknown protocol, its package missing)."""


class DataFolder:
    """One folder of files addressed by names relative to it (`index.jsonl`, `shards/shard-00000.safetensors`)."""

    def __init__(self, location: str | Path | DataFolder) -> None:
        if isinstance(location, DataFolder):
            location = location.location
        if isinstance(location, str) and "://" in location:
            protocol = str(location).split("://", 1)[0]
            self.location: str | Path = str(location).rstrip("/")
            if protocol == "file":
                self.location = Path(str(location)[len("file://"):])
        else:
            self.location = Path(location)
        self._fs: Any = None
        self._root = ""

    # ------------------------------------------------------------------------------------------------ identity

    @property
    def local(self) -> Path | None:
        """The folder's path when it is on this machine's file system, else None."""
        return self.location if isinstance(self.location, Path) else None

    def __str__(self) -> str:
        return str(self.location)

    def __repr__(self) -> str:
        return f"DataFolder({str(self.location)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (DataFolder, (self.location,))  # a worker opens the store itself, with its own credentials

    def name(self, relative: str) -> str:
        """How a file of the folder is named in messages: its path, or its URL."""
        return str(self.local / relative) if self.local else f"{self.location}/{relative}"

    @property
    def fs(self) -> Any:
        """The fsspec filesystem of a remote folder (opened on first use)."""
        if self._fs is None:
            import fsspec

            try:
                self._fs, self._root = fsspec.core.url_to_fs(str(self.location))
            except (ImportError, ValueError) as exc:
                raise FolderUnavailable(f"{self.location}: cannot open this URL with fsspec ({exc}); for s3:// install "
                                 f"s3fs (pip install 's3fs')") from None
            self._root = self._root.rstrip("/")
        return self._fs

    def _remote(self, relative: str) -> str:
        self.fs  # noqa: B018 (opens the filesystem, which sets the root)
        return posixpath.join(self._root, relative)

    # ------------------------------------------------------------------------------------------------- reading

    def exists(self, relative: str) -> bool:
        if self.local:
            return (self.local / relative).is_file()
        path = self._remote(relative)
        self.fs.invalidate_cache(posixpath.dirname(path))  # another worker may have written it since
        return bool(self.fs.exists(path))

    def read_bytes(self, relative: str) -> bytes:
        if self.local:
            return (self.local / relative).read_bytes()
        try:
            return bytes(self.fs.cat_file(self._remote(relative)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.name(relative)}: no such file") from None

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_text(relative))

    def glob(self, pattern: str) -> list[str]:
        """Names (relative to the folder) of the files matching `pattern`, e.g. `shards/shard-*.safetensors`."""
        if self.local:
            return sorted(str(p.relative_to(self.local)) for p in self.local.glob(pattern) if p.is_file())
        base = self._remote("")
        self.fs.invalidate_cache()
        found = self.fs.glob(self._remote(pattern), detail=True)  # folders match too: keep the files
        return sorted(posixpath.relpath(p, base) for p, info in found.items() if info.get("type") == "file")

    # ------------------------------------------------------------------------------------------------- writing

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write one file whole: a local temporary renamed into place, or one upload to an object store."""
        if self.local:
            atomic.write_bytes(self.local / relative, data)
        else:
            self.fs.pipe_file(self._remote(relative), data)

    def write_json(self, relative: str, obj: Any) -> None:
        self.write_bytes(relative, atomic.json_bytes(obj))

    def write_jsonl(self, relative: str, rows: Iterable[dict[str, Any]]) -> None:
        self.write_bytes(relative, atomic.jsonl_bytes(rows))

    def remove(self, relative: str) -> None:
        if self.local:
            (self.local / relative).unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._remote(relative))

    def move(self, source: str, target: str) -> None:
        """Move a file of the folder over another: a rename locally (atomic, fsynced); on an object store a copy
        then a delete (the target object appears whole)."""
        if self.local:
            os.replace(self.local / source, self.local / target)
            atomic.fsync_dir((self.local / target).parent)
        else:
            self.fs.mv(self._remote(source), self._remote(target))

    def prune(self, relative: str) -> None:
        """Remove the subfolder `relative` if it is empty (local folders; an object store has no empty folders)."""
        if self.local:
            with contextlib.suppress(OSError):
                (self.local / relative).rmdir()

    def remove_stale_temporaries(self, relative: str) -> int:
        """Temporaries a killed writer left in a subfolder (local folders only: uploads leave none)."""
        return atomic.remove_stale_temporaries(self.local / relative) if self.local else 0

    @contextlib.contextmanager
    def lock(self, cache: Path) -> Iterator[None]:
        """Hold the folder's exclusive lock; a second holder fails at once with a message naming the folder."""
        if self.local:
            self.local.mkdir(parents=True, exist_ok=True)
            path = self.local / LOCK
        else:
            self.fs  # noqa: B018 (a URL fsspec cannot open fails here, before anything is written)
            path = Path(cache) / "locks" / f"{hashlib.sha256(str(self).encode()).hexdigest()[:24]}.lock"
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"{self} is being curated by another process") from None
            yield
