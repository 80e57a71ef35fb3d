"""A torch `Dataset` over curated shards: what the trainers read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from show1.config import Size
from show1.data.clip_index import INDEX_PARQUET, ClipIndex
from show1.data.curated_files import CuratedFiles
from show1.data.shards import ShardReader, tensor_name


class CuratedClips(Dataset):
    """Clips of a curated folder at one resolution.

    Each item is `{"frames": (F, 3, H, W) tensor, "caption": str, "clip_id": str, "index": int}`;
    frames are float in [-1, 1] (the diffusion convention) or, with `normalize=False`, uint8.
    `split` is "train", "val" or None for both. The clips are read from the columnar `index.parquet`
    (`ClipIndex`): no Python object per clip is built until the clip is read.
    """

    def __init__(self, root: Path | str, size: Size | str = "64x40", split: str | None = "train",
                 normalize: bool = True, files: CuratedFiles | None = None):
        """`root`: a curated folder; one at a URL is read through `files` (`CuratedFiles` with a data cache)."""
        self.files = files or CuratedFiles(root)
        self.root = self.files.root
        self.size = size if isinstance(size, Size) else Size.model_validate(size)
        local = self.files.local
        self.index = ClipIndex(self.root, split, None if local else self.files.index(),
                               None if local else self.files.view())
        curated = self.index.resolutions
        if curated and self.size.key not in curated:
            raise ValueError(f"{self.files.folder.name(INDEX_PARQUET)}: clips were curated at {curated}, not "
                             f"{self.size.key}; add it to curate.clip.sizes and curate again")
        self.normalize = normalize
        self._reader = ShardReader(self.root if self.files.local else self.files)

    def shards_of(self, indices: list[int]) -> list[str]:
        """The shards clips `indices` are read from, in order (each once): what a streamed loader fetches ahead."""
        return list(dict.fromkeys(self.index.shard(i) for i in indices))

    def __len__(self) -> int:
        return len(self.index)

    def captions(self) -> list[str]:
        """Every distinct caption of these clips, in the order of their first clip."""
        return self.index.captions()

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.index):
            raise IndexError(f"clip {index} of {len(self.index)}")
        row = self.index.row(index)
        frames = torch.from_numpy(self._reader.frames(row["shard"], tensor_name(row["tensor"], self.size.key),
                                                      row["frame_start"], row["num_frames"]))
        frames = frames.permute(0, 3, 1, 2).contiguous()  # (F, H, W, 3) -> (F, 3, H, W), while still uint8
        if self.normalize:  # in place: half the time of `frames.float() / 127.5 - 1`, the same values
            frames = frames.to(torch.float32).div_(127.5).sub_(1.0)
        return {"frames": frames, "caption": row["caption"], "clip_id": row["clip_id"], "index": index}
