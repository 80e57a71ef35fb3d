"""Shards: many clips per safetensors file, uint8 frames, one tensor per source and size.

A source's sampled frames are stored once per size as `<source_key>/<W>x<H>` with shape (N, H, W, 3);
clips are frame ranges into it (overlapping clips share frames instead of copying them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load, save, save_file

from show1 import atomic
from show1.data.folder import DataFolder

FORMAT = "show1-clips-v1"


def tensor_name(source_key: str, size_key: str) -> str:
    return f"{source_key}/{size_key}"


def write_shard(folder: DataFolder, name: str, tensors: dict[str, np.ndarray]) -> None:
    """Write `tensors` as the shard `name` of `folder`, whole (a local temporary renamed into place, or one upload)."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if folder.local:  # streamed to the temporary: no second copy of the frames in memory
        with atomic.atomic_path(folder.local / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
    else:
        folder.write_bytes(name, save(tensors, metadata={"format": FORMAT}))


def source_of(tensor: str) -> str:
    """The source key of a tensor name (`<source_key>/<W>x<H>`)."""
    return tensor.rsplit("/", 1)[0]


def _kept_tensors(folder: DataFolder, name: str, sources: set[str]) -> dict[str, np.ndarray] | None:
    """The shard's tensors that do not belong to `sources`; None when it holds none of `sources`."""
    if folder.local:
        with safe_open(str(folder.local / name), framework="np") as handle:
            names = list(handle.keys())
            if not any(source_of(n) in sources for n in names):
                return None
            return {n: handle.get_tensor(n) for n in names if source_of(n) not in sources}
    tensors = load(folder.read_bytes(name))
    if not any(source_of(n) in sources for n in tensors):
        return None
    return {n: t for n, t in tensors.items() if source_of(n) not in sources}


def drop_sources(folder: DataFolder, name: str, sources: set[str]) -> bool:
    """Rewrite the shard `name` of `folder` without the tensors of `sources` (whole, as `write_shard` writes);
    False when it had none of them. The caller removes a shard that would be left empty."""
    kept = _kept_tensors(folder, name, sources)
    if kept is None:
        return False
    write_shard(folder, name, kept)
    return True


class ShardReader:
    """Lazily opened shards; reads only the frames a clip needs."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._handles: dict[str, object] = {}

    def _handle(self, shard: str):
        handle = self._handles.get(shard)
        if handle is None:
            path = self.root / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in the index is missing")
            handle = safe_open(str(path), framework="pt")
            if (handle.metadata() or {}).get("format") != FORMAT:
                raise ValueError(f"{path}: not a show1 clip shard (format {handle.metadata()})")
            self._handles[shard] = handle
        return handle

    def frames(self, shard: str, name: str, first: int, count: int):
        """Frames `first … first+count-1` of tensor `name` as a uint8 torch tensor (count, H, W, 3)."""
        handle = self._handle(shard)
        if name not in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            raise KeyError(f"{self.root / shard}: no tensor '{name}'")
        return handle.get_slice(name)[first:first + count]

    def __getstate__(self) -> dict:
        # safetensors handles do not pickle: DataLoader workers reopen shards themselves.
        return {"root": self.root, "_handles": {}}
