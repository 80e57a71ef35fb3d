"""The order training takes clips in: a seeded permutation per epoch, whose position is saved in every checkpoint.

`train.shard_block` 0 shuffles the whole data set at once: any clip may follow any other. That is what a local folder
wants, but a data set streamed through a cache smaller than itself would fetch a shard for nearly every clip
(measured with mosaicml-streaming's cache, the same pattern: 77 downloads of each shard per epoch). With N > 0 the
epoch's shards are shuffled and taken N at a time, and the clips of each block of N shards are shuffled among
themselves: the loader then reads from N shards for a while, so a cache that holds N shards (plus those fetched
ahead) fetches each shard about once per epoch. Both orders are a function of the seed, the epoch and the clips'
shards alone, so a resumed run, any number of processes and any number of loader workers read the same clips.
"""

from __future__ import annotations

import numpy as np
import torch


class DataOrder:
    """Clip indices in a seeded permutation per epoch; `position` (epoch, offset) is saved and restored.

    `shards`: the shard number of each clip (any integers), needed when `block` > 0."""

    def __init__(self, size: int, seed: int, epoch: int = 0, offset: int = 0, shards: np.ndarray | None = None,
                 block: int = 0):
        if size == 0:
            raise ValueError("the curated data has no clips for this split")
        if block and (shards is None or len(shards) != size):
            raise ValueError("an order by blocks of shards needs the shard of every clip")
        self.size, self.seed, self.epoch, self.offset = size, seed, epoch, offset
        self.shards, self.block = shards, block
        self._cached: tuple[int, torch.Tensor] | None = None

    def _permutation(self) -> torch.Tensor:
        if self._cached is None or self._cached[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._cached = (self.epoch, torch.randperm(self.size, generator=generator) if not self.block
                            else self._by_blocks(generator))
        return self._cached[1]

    def _by_blocks(self, generator: torch.Generator) -> torch.Tensor:
        assert self.shards is not None
        names, of_clip = np.unique(self.shards, return_inverse=True)
        shard_order = torch.randperm(len(names), generator=generator).numpy()
        rank = np.empty(len(names), dtype=np.int64)
        rank[shard_order] = np.arange(len(names))
        block_of_clip = rank[of_clip] // self.block
        parts = []
        for block in range(int(block_of_clip.max()) + 1):
            members = torch.from_numpy(np.flatnonzero(block_of_clip == block))
            parts.append(members[torch.randperm(len(members), generator=generator)])
        return torch.cat(parts)

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            permutation = self._permutation()
            while self.offset < self.size and len(out) < count:
                out.append(int(permutation[self.offset]))
                self.offset += 1
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def __deepcopy__(self, memo: dict) -> DataOrder:
        return DataOrder(self.size, self.seed, self.epoch, self.offset, self.shards, self.block)
