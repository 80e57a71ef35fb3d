"""Shards: many sources' encoded frames per safetensors file.

A source's sampled frames at one size are stored once, encoded (`show1.data.clip_codec`: an MP4 with a keyframe
at every clip's first frame), as the uint8 tensor `<source_key>/<W>x<H>` holding the file's bytes; clips are frame
ranges into it (clips that overlap share frames instead of copying them). safetensors is the container: a header
naming each source's byte range, so a reader takes one source's bytes without reading the rest, and dropping a
source (`drop_sources`) is rewriting the file without it.

A shard verifies itself: its header's metadata (`show1`) holds `content_sha256`, the sha256 of every tensor's name
and bytes in name order (`verify_shard`). A copy damaged anywhere, header or data, fails the check, so a shard
fetched into a cache is checked before training reads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load, save

from show1.data.clip_codec import decode_frames
from show1.data.folder import DataFolder

FORMAT = "show1-clips-v2"  # v1 (show1 before issue 34) stored raw uint8 frames: ~20 MB per paper clip
RAW_FORMAT = "show1-clips-v1"
METADATA = "show1"  # the header's metadata entry describing the shard: {"format": …, "content_sha256": …}


class ShardFormatError(ValueError):
    """A file that is not a shard this show1 reads: damaged, or written by an earlier show1."""


def tensor_name(source_key: str, size_key: str) -> str:
    return f"{source_key}/{size_key}"


def source_of(tensor: str) -> str:
    """The source key of a tensor name (`<source_key>/<W>x<H>`)."""
    return tensor.rsplit("/", 1)[0]


def content_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over each tensor's name, length and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name]).tobytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def as_tensor(encoded: bytes) -> np.ndarray:
    """Encoded bytes as the 1-D uint8 tensor a shard stores."""
    return np.frombuffer(encoded, dtype=np.uint8)


def shard_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    """A shard file holding `tensors` (encoded sources, see `as_tensor`), with its content hash."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    # One metadata entry: safetensors writes several in an order that changes from process to process.
    described = json.dumps({"format": FORMAT, "content_sha256": content_sha256(tensors)}, sort_keys=True)
    return save(tensors, metadata={METADATA: described})


def write_shard(folder: DataFolder, name: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Write `tensors` as the shard `name` of `folder`, whole (a local temporary renamed into place, or one upload).
    Encoded frames are small (~0.5 MB per paper clip): the file is made in memory."""
    folder.write_bytes(name, shard_bytes(tensors))


def _loaded(folder: DataFolder, name: str) -> dict[str, np.ndarray]:
    return load(folder.read_bytes(name))


def drop_sources(folder: DataFolder, name: str, sources: set[str]) -> bool:
    """Rewrite the shard `name` of `folder` without the tensors of `sources` (whole, as `write_shard` writes);
    False when it had none of them. The caller removes a shard that would be left empty."""
    tensors = _loaded(folder, name)
    if not any(source_of(n) in sources for n in tensors):
        return False
    write_shard(folder, name, {n: t for n, t in tensors.items() if source_of(n) not in sources})
    return True


def _described(path: Path, metadata: dict[str, str] | None) -> dict[str, str]:
    """The shard's own description (format, content hash), or ShardFormatError saying what the file is."""
    metadata = metadata or {}
    if metadata.get("format") == RAW_FORMAT:
        raise ShardFormatError(f"{path}: raw frames curated by an earlier show1; curate the folder again "
                               f"(show1 curate MANIFEST --out {path.parent.parent})")
    try:
        described = json.loads(metadata.get(METADATA, "{}"))
    except ValueError:
        described = {}
    found = described.get("format") if isinstance(described, dict) else None
    if found != FORMAT:
        raise ShardFormatError(f"{path}: not a show1 clip shard (format {found!r}, expected {FORMAT})")
    return described


def verify_shard(path: Path | str) -> None:
    """Raise ShardFormatError unless `path` is a whole shard whose content matches the hash in its header."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as handle:
            described = _described(path, handle.metadata())
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except ShardFormatError:
        raise
    except Exception as exc:  # (safetensors raises its own errors for a damaged header or size)
        raise ShardFormatError(f"{path}: damaged shard ({exc})") from None
    if content_sha256(tensors) != described.get("content_sha256"):
        raise ShardFormatError(f"{path}: damaged shard (its content does not match the sha256 in its header)")


class ShardReader:
    """Reads one source's bytes from its shard and decodes only the clip's frames.

    `files` is a local folder (shards opened once and kept open) or a `CuratedFiles` of a folder at a URL (each read
    takes the shard's cached copy for the read only, so the cache may evict it between reads)."""

    def __init__(self, files: Path | str | Any):
        self.files = files
        self._handles: dict[str, Any] = {}

    def _local_handle(self, shard: str) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            path = Path(self.files) / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in the index is missing")
            handle = safe_open(str(path), framework="np")
            _described(path, handle.metadata())
            self._handles[shard] = handle
        return handle

    def encoded(self, shard: str, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` (one source at one size)."""
        if isinstance(self.files, (str, Path)):
            return self._tensor(self._local_handle(shard), Path(self.files) / shard, name)
        with self.files.shard(shard) as path, safe_open(str(path), framework="np") as handle:
            _described(path, handle.metadata())
            return self._tensor(handle, path, name)

    @staticmethod
    def _tensor(handle: Any, path: Path, name: str) -> np.ndarray:
        if name not in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            raise KeyError(f"{path}: no tensor '{name}'")
        return handle.get_tensor(name)

    def frames(self, shard: str, name: str, first: int, count: int | None) -> np.ndarray:
        """Frames `first … first+count-1` (None: to the end) of tensor `name` as uint8 (count, H, W, 3)."""
        try:
            return decode_frames(memoryview(self.encoded(shard, name)), first, count)
        except ValueError as exc:
            raise ShardFormatError(f"{shard}, {name}: {exc}") from None

    def __getstate__(self) -> dict:
        # safetensors handles do not pickle: DataLoader workers reopen shards themselves.
        return {"files": self.files, "_handles": {}}
