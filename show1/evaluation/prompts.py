"""Prompt sets: text files with one prompt per line (`#` starts a comment), shipped in data/prompts/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from show1.inputs import InputError, check_prompt, read_text, shown

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
    cycles them to that many (video i gets prompt i mod N: 2048 videos of UCF-101's 101 class prompts).

    A file that is not UTF-8 text, or a line that holds only control characters, is an `InputError` naming the file
    and the line."""
    path = Path(spec)
    if not path.is_file():
        named = SHIPPED / f"{spec}.txt"
        if not named.is_file():
            hint = " (a folder)" if path.is_dir() else ""
            raise FileNotFoundError(f"prompt set {shown(str(spec))}{hint}: not a file, nor one of the shipped sets "
                                    f"({', '.join(available())})")
        path = named
    prompts = tuple(_prompts(path))
    if not prompts:
        raise InputError(f"{path}: no prompts (one per line; '#' starts a comment)")
    prompts = prompts[:limit] if limit else prompts
    if videos is not None:
        if videos < 1:
            raise ValueError(f"evaluate.videos must be at least 1, got {videos}")
        prompts = tuple(prompts[i % len(prompts)] for i in range(videos))
    return PromptSet(path.stem, prompts, path)


def _prompts(path: Path) -> list[str]:
    """The prompts of a prompt file: its lines (split at newlines only, so line numbers are an editor's), without
    `#` comments and blank lines, each checked."""
    prompts = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        text = line.split("#", 1)[0].strip()
        if text:
            prompts.append(check_prompt(text, f"{path} line {number}"))
    return prompts
