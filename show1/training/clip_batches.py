"""The clips of each micro-step, read ahead by DataLoader worker processes in the order training takes them.

Training takes clips in a seeded order (`DataOrder`): each micro-step the whole global batch's indices, of which this
process keeps its slots. That order is known ahead of time, so `ClipBatches` hands the next steps' indices to
`train.loader_workers` DataLoader workers, which decode them while the model trains, and yields each step's clips in
order. A clip is a pure function of its index, so the batches are the same with any number of workers (0: read in
this process when asked, as before) and a resumed run, whose `DataOrder` is restored from its checkpoint, reads
exactly what the uninterrupted run read from that step on.

The order the workers follow is a copy of the training's `DataOrder`; the training advances its own (the one its
checkpoints save) and checks that every batch it receives holds the indices it took.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset


class Order(Protocol):
    def take(self, count: int) -> list[int]: ...


class _StepIndices:
    """The DataLoader's batch sampler: per micro-step, this process's clip indices of the global batch."""

    def __init__(self, order: Order, global_count: int, slots: list[int],
                 on_ahead: Callable[[list[int]], None] | None) -> None:
        self.order, self.global_count, self.slots, self.on_ahead = order, global_count, slots, on_ahead

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            chosen = self.order.take(self.global_count)
            mine = [chosen[slot] for slot in self.slots]
            if self.on_ahead is not None:
                self.on_ahead(mine)
            yield mine


def _as_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


class ClipBatches:
    """Iterate this process's clips, one list per micro-step, read ahead by `workers` processes.

    `on_ahead(indices)` is called (in this process) as each step's indices are handed to the workers, ahead of
    training reaching them: a streamed data set fetches their shards then."""

    def __init__(self, clips: Dataset, order: Order, global_count: int, slots: list[int], workers: int = 0,
                 steps_ahead: int = 2, on_ahead: Callable[[list[int]], None] | None = None) -> None:
        if workers < 0:
            raise ValueError(f"train.loader_workers must be 0 or more, got {workers}")
        sampler = _StepIndices(copy.deepcopy(order), global_count, slots, on_ahead)
        options: dict[str, Any] = {"prefetch_factor": steps_ahead, "persistent_workers": True} if workers else {}
        # Its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, which the
        # training's checkpoints restore, so a resumed run would draw from another point of it than the first run.
        self._loader = DataLoader(clips, batch_sampler=sampler, num_workers=workers, collate_fn=_as_list,
                                  generator=torch.Generator().manual_seed(0), **options)
        self._batches: Iterator[list[dict[str, Any]]] | None = None

    def next(self, expected: list[int]) -> list[dict[str, Any]]:
        """The next micro-step's clips, which must be `expected` (the indices training took)."""
        if self._batches is None:
            self._batches = iter(self._loader)
        items = next(self._batches)
        got = [item["index"] for item in items]
        if got != expected:
            raise RuntimeError(f"the loader read clips {got} where training took {expected}: its order diverged")
        return items

    def close(self) -> None:
        """Stop the workers."""
        self._batches = None  # the iterator's workers exit when it is collected
        self._loader = None  # type: ignore[assignment]
