"""Shards: many clips per safetensors file, uint8 frames, one tensor per source and size.

A source's sampled frames are stored once per size as `<source_key>/<W>x<H>` with shape (N, H, W, 3);
clips are frame ranges into it (overlapping clips share frames instead of copying them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from show1 import atomic

FORMAT = "show1-clips-v1"


def tensor_name(source_key: str, size_key: str) -> str:
    return f"{source_key}/{size_key}"


def write_shard(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write `tensors` atomically (temp file, fsync, rename)."""
    with atomic.atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                  metadata={"format": FORMAT})


def source_of(tensor: str) -> str:
    """The source key of a tensor name (`<source_key>/<W>x<H>`)."""
    return tensor.rsplit("/", 1)[0]


def tensor_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="np") as handle:
        return list(handle.keys())


def drop_sources(path: Path, sources: set[str]) -> bool:
    """Rewrite the shard at `path` without the tensors of `sources` (atomically); False when it had none of them.

    The caller removes a shard that would be left empty."""
    names = tensor_names(path)
    keep = [name for name in names if source_of(name) not in sources]
    if len(keep) == len(names):
        return False
    with safe_open(str(path), framework="np") as handle:
        tensors = {name: handle.get_tensor(name) for name in keep}
    write_shard(path, tensors)
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
