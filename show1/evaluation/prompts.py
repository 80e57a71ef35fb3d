"""Prompt sets: text files with one prompt per line (`#` starts a comment), shipped in data/prompts/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "prompts"


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]
    source: Path


def available() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.txt"))


def load_prompt_set(spec: str | Path, limit: int | None = None, videos: int | None = None) -> PromptSet:
    """A shipped set by name (`demo`, `ucf101`) or a text file; `limit` keeps the first N prompts; `videos` then
    cycles them to that many (video i gets prompt i mod N: 2048 videos of UCF-101's 101 class prompts)."""
    path = Path(spec)
    if not path.is_file():
        named = SHIPPED / f"{spec}.txt"
        if not named.is_file():
            raise FileNotFoundError(f"prompt set {str(spec)!r}: not a file, nor one of the shipped sets "
                                    f"({', '.join(available())})")
        path = named
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; '#' starts a comment)")
    prompts = prompts[:limit] if limit else prompts
    if videos is not None:
        if videos < 1:
            raise ValueError(f"evaluate.videos must be at least 1, got {videos}")
        prompts = tuple(prompts[i % len(prompts)] for i in range(videos))
    return PromptSet(path.stem, prompts, path)
