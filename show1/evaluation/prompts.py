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


def load_prompt_set(spec: str | Path, limit: int | None = None) -> PromptSet:
    """A shipped set by name (`demo`, `ucf101`) or a text file; `limit` keeps the first N prompts."""
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
    return PromptSet(path.stem, prompts[:limit] if limit else prompts, path)
