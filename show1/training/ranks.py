"""Data parallelism in one place: how many processes train, which share of a global batch is this process's,
who writes, and where the processes wait for each other.

`train.batch_size` is the global batch of one optimizer step, whatever the number of processes: with N processes
and `train.grad_accum` micro-steps, each process takes batch_size / (N × grad_accum) clips per micro-step, its own
contiguous share of the same global order. Every random draw of a clip (its window, noise level, caption dropout,
noise and timestep) comes from a generator keyed by the clip's place in the global batch (`item_generator`), so
the math does not depend on N: one process and two compute the same losses and weights (up to float reduction
order). Only the main process writes (metrics.jsonl, checkpoints, samples, final/, the MLflow run).

Launch N processes with `torchrun --nproc_per_node N -m show1.cli train …` or `accelerate launch
--multi_gpu --num_processes N -m show1.cli train …` (on a machine without GPUs both run N CPU processes on gloo).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch


class BatchSplitError(ValueError):
    """A global batch that N processes and the accumulation steps cannot share evenly."""


def micro_batch(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Clips per process per micro-step."""
    share = world_size * grad_accum
    if batch_size % share:
        raise BatchSplitError(
            f"train.batch_size {batch_size} is the global batch of an optimizer step: it must be a multiple of "
            f"processes × train.grad_accum = {world_size} × {grad_accum} = {share} (each process takes an equal "
            "share of every micro-step)")
    return batch_size // share


def item_generator(seed: int, step: int, micro: int, slot: int) -> torch.Generator:
    """The generator of one clip of the global batch: keyed by the run's seed, the optimizer step, the micro-step
    and the clip's slot in the global micro-batch, so any process draws the same numbers for it (and a resumed run
    draws what an uninterrupted one would)."""
    key = hashlib.sha256(f"show1-train/{seed}/{step}/{micro}/{slot}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    accelerator: Any  # accelerate.Accelerator

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def slots(self, per_process: int) -> range:
        """This process's slots in a global micro-batch of per_process × world_size clips."""
        return range(self.rank * per_process, (self.rank + 1) * per_process)

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (one all-reduce)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean").item())

    def wait(self) -> None:
        """Every process reaches this point before any goes on."""
        self.accelerator.wait_for_everyone()
