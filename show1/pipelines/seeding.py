"""Where the cascade's random numbers come from.

Two ways, chosen by `sampling.seeding`:

- `reference` (the default): Show-1's `run_inference.py` calls `torch.manual_seed(seed)` again for every stage, for
  the interpolation's shared start noise, for every interpolation segment and for every sr1 window. A stage pipeline
  given a `Reseeding` does the same: each of those points draws from a generator freshly seeded with `seed`, so one
  seed gives the reference's video, and a stage's output does not depend on how much randomness the stages before
  it used.
- `stream`: one `torch.Generator`, carried through the whole cascade (what show1 did before; diffusers' usual way).

A stage pipeline takes either as its `generator` argument (`RandomSource`). For a batch of videos, `PerVideo` holds one
of them per video: video i then draws exactly what it draws alone with its own source (`show1 generate --prompts`).
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


@dataclass(frozen=True)
class PerVideo:
    """One source per video of a batch. At every draw point, video i draws from its own generator, in the order it
    draws alone: a `Reseeding` becomes a private generator freshly seeded with its seed (the same numbers as the
    reseeded global one), a generator is carried on. The global random state is never touched, so whatever would
    draw from it (the base stage's reference dropout) cannot be batched."""

    sources: tuple[Reseeding | torch.Generator, ...]

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("PerVideo needs one source per video, got none")
        for source in self.sources:
            if not isinstance(source, Reseeding | torch.Generator):
                raise TypeError(f"PerVideo sources are Reseeding or torch.Generator, got {type(source).__name__}")

    def __len__(self) -> int:
        return len(self.sources)

    def fresh(self) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(s.seed) if isinstance(s, Reseeding) else s for s in self.sources]


RandomSource = torch.Generator | Reseeding | PerVideo | None
# What a draw point hands to the noise draws: one generator, one per video of the batch, or None.
DrawSource = torch.Generator | list[torch.Generator] | None


def draw_point(source: RandomSource) -> DrawSource:
    """The generator(s) for one reseeding point: freshly seeded under `Reseeding` (per video under `PerVideo`), else
    the one generator (or None)."""
    return source.fresh() if isinstance(source, Reseeding | PerVideo) else source


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
