"""A torch `Dataset` over curated shards: what the trainers read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from show1.atomic import read_jsonl
from show1.config import Size
from show1.data.curate import INDEX
from show1.data.shards import ShardReader, tensor_name


class CuratedClips(Dataset):
    """Clips of a curated folder at one resolution.

    Each item is `{"frames": (F, 3, H, W) tensor, "caption": str, "clip_id": str, "index": int}`;
    frames are float in [-1, 1] (the diffusion convention) or, with `normalize=False`, uint8.
    `split` is "train", "val" or None for both.
    """

    def __init__(self, root: Path | str, size: Size | str = "64x40", split: str | None = "train",
                 normalize: bool = True):
        self.root = Path(root)
        index = self.root / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{index} not found: run `show1 curate MANIFEST --out {self.root}` first")
        self.size = size if isinstance(size, Size) else Size.model_validate(size)
        if split not in (None, "train", "val"):
            raise ValueError(f"split must be 'train', 'val' or None, got {split!r}")
        self.rows = [r for r in read_jsonl(index) if split is None or r["split"] == split]
        for row in self.rows[:1]:
            if self.size.key not in row["resolutions"]:
                raise ValueError(f"{index}: clips were curated at {row['resolutions']}, not {self.size.key}; "
                                 "add it to curate.clip.sizes and curate again")
        self.normalize = normalize
        self._reader = ShardReader(self.root)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        frames = self._reader.frames(row["shard"], tensor_name(row["tensor"], self.size.key),
                                     row["frame_start"], row["num_frames"])
        frames = frames.permute(0, 3, 1, 2).contiguous()  # (F, H, W, 3) -> (F, 3, H, W)
        if self.normalize:
            frames = frames.to(torch.float32) / 127.5 - 1.0
        return {"frames": frames, "caption": row["caption"], "clip_id": row["clip_id"], "index": index}
