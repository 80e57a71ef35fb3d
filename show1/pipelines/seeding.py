"""Where the cascade's random numbers come from.

Two ways, chosen by `sampling.seeding`:

- `reference` (the default): Show-1's `run_inference.py` calls `torch.manual_seed(seed)` again for every stage, for
  the interpolation's shared start noise, for every interpolation segment and for every sr1 window. A stage pipeline
  given a `Reseeding` does the same: each of those points draws from a generator freshly seeded with `seed`, so one
  seed gives the reference's video, and a stage's output does not depend on how much randomness the stages before
  it used.
- `stream`: one `torch.Generator`, carried through the whole cascade (what show1 did before; diffusers' usual way).

A stage pipeline takes either as its `generator` argument (`RandomSource`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reseeding:
    """The reference's seeding: `fresh()` is the global generator, reseeded with `seed` (`torch.manual_seed`), as
    every reseeding point of run_inference.py does. Use it inside `rng_scope`, which restores the caller's global
    random state afterwards."""

    seed: int

    def fresh(self) -> torch.Generator:
        return torch.manual_seed(self.seed)


RandomSource = torch.Generator | Reseeding | None


def draw_point(source: RandomSource) -> torch.Generator | None:
    """The generator for one reseeding point: freshly seeded under `Reseeding`, else the one generator (or None)."""
    return source.fresh() if isinstance(source, Reseeding) else source


@contextlib.contextmanager
def rng_scope(source: RandomSource, device: torch.device | str | None = None) -> Iterator[None]:
    """Around a stage run with `Reseeding`: the global random state (CPU, and `device` when it is a GPU) is put back
    as it was afterwards, so reseeding never leaks into the caller. Nothing to do for a generator of one's own."""
    if not isinstance(source, Reseeding):
        yield
        return
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
