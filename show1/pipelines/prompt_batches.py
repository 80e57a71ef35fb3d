"""Many prompts per load: the batches a prompt set is generated in, and the file each video goes to. (The prompts
come from `show1.evaluation.prompts.load_prompt_set`: a text file, one prompt per line, or a shipped set.)

`show1 generate --prompts FILE --out DIR --batch-size B` writes DIR/000.mp4, DIR/001.mp4, …; video i uses seed
`--seed + i`, so it equals `show1 generate "PROMPT_i" --seed S+i` (up to float rounding of batched arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptBatch:
    """Prompts `start` … `start + len(prompts) - 1` of a file, generated together with seeds `seeds`."""

    start: int
    prompts: list[str]
    seeds: list[int]


def prompt_batches(prompts: list[str], batch_size: int, seed: int) -> list[PromptBatch]:
    """`prompts` in batches of at most `batch_size`, prompt i with seed `seed + i`."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    return [PromptBatch(start, prompts[start:start + batch_size],
                        [seed + i for i in range(start, min(start + batch_size, len(prompts)))])
            for start in range(0, len(prompts), batch_size)]


def video_path(folder: Path, index: int, count: int, suffix: str = ".mp4") -> Path:
    """`folder/000.mp4` for video 0 of up to 1000 (more digits when there are more videos)."""
    return folder / f"{index:0{max(3, len(str(count - 1)))}d}{suffix}"
