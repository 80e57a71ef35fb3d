"""The order training takes clips in (show1/training/data_order.py): the same permutation as always with no shard
blocks, blocks of N shards read one after another with `train.shard_block` N, and the same clips from any saved
position."""

import copy

import numpy as np
import pytest
import torch

from show1.training.data_order import DataOrder


def reference_take(size: int, seed: int, takes: int, count: int) -> list[list[int]]:
    """The order as the trainer always drew it: a fresh seeded permutation per epoch, read in order."""
    epoch, offset, out = 0, 0, []
    for _ in range(takes):
        batch = []
        while len(batch) < count:
            permutation = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            while offset < size and len(batch) < count:
                batch.append(int(permutation[offset]))
                offset += 1
            if offset == size:
                epoch, offset = epoch + 1, 0
        out.append(batch)
    return out


def test_without_blocks_the_order_is_the_global_permutation_of_every_epoch():
    order = DataOrder(37, seed=3)
    assert [order.take(5) for _ in range(30)] == reference_take(37, 3, 30, 5)


def test_with_blocks_each_stretch_of_the_epoch_reads_n_shards_and_every_clip_once():
    shards = np.repeat(np.arange(10), 7)[np.random.default_rng(0).permutation(70)]
    order = DataOrder(70, seed=1, shards=shards, block=2)
    for _ in range(2):  # two epochs, each its own shuffle
        epoch = order.take(70)
        assert sorted(epoch) == list(range(70))
        assert all(len(set(shards[epoch[i:i + 14]])) == 2 for i in range(0, 70, 14))
    assert DataOrder(70, seed=1, shards=shards, block=2).take(70) != DataOrder(70, seed=2, shards=shards,
                                                                                  block=2).take(70)


def test_a_restored_position_reads_what_the_uninterrupted_order_reads():
    shards = np.arange(40) // 4
    whole = DataOrder(40, seed=5, shards=shards, block=3)
    first = [whole.take(6) for _ in range(9)]
    again = DataOrder(40, seed=5, shards=shards, block=3)
    [again.take(6) for _ in range(4)]
    resumed = DataOrder(40, seed=5, epoch=again.epoch, offset=again.offset, shards=shards, block=3)
    assert [resumed.take(6) for _ in range(5)] == first[4:]
    ahead = copy.deepcopy(resumed)  # the loader's copy: the same clips, its own position
    assert ahead.take(6) == resumed.take(6)


def test_blocks_need_the_shard_of_every_clip():
    with pytest.raises(ValueError, match="shard of every clip"):
        DataOrder(10, seed=0, block=2)
    with pytest.raises(ValueError, match="no clips"):
        DataOrder(0, seed=0)
