"""Checks of what a person hands show1: prompts, text files, seeds, denoising steps.

Each failure is an `InputError`, one line that names the input (an option, an argument, a file and line) and says
what is wrong. Input echoed in a message goes through `shown`, which escapes control characters, so a hostile prompt
or file name cannot drive the terminal it is printed on.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

# torch.Generator.manual_seed takes 0 … 2**64 - 1 (it folds negatives into that range: -1 would be 2**64 - 1).
SEED_LIMIT = 2**64
# The schedulers of every stage are trained on 1000 timesteps: more denoising steps than that only repeats them.
MAX_STEPS = 1000


class InputError(ValueError):
    """Input show1 cannot use; the message is one line naming the input and what is wrong with it."""


def _escaped_byte(char: str) -> int | None:
    """The byte an undecodable argument byte stands for: Python hands invalid UTF-8 in argv (and file names) over
    as surrogate escapes U+DC80 … U+DCFF."""
    return ord(char) - 0xDC00 if "\udc80" <= char <= "\udcff" else None


def shown(text: str, limit: int = 80) -> str:
    """`text` quoted for a message, its first `limit` characters: control and invisible characters escaped as
    Python writes them (`\\x1b`, `\\u202e`), undecodable bytes as `\\xff`."""
    head = text[:limit]
    body = "".join(f"\\x{byte:02x}" if (byte := _escaped_byte(c)) is not None
                   else c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in head)
    return f"'{body}'{'…' if len(text) > limit else ''}"


def printable(message: str) -> str:
    """A message safe to print: control characters other than line breaks escaped (see `shown`)."""
    return "".join(c if c == "\n" or (c.isprintable() and _escaped_byte(c) is None) else shown(c)[1:-1]
                   for c in message)


def visible(text: str) -> str:
    """`text` without its control characters, stripped: what is left of it to read."""
    return "".join(c for c in text if unicodedata.category(c) != "Cc").strip()


def check_prompt(prompt: str, what: str = "the prompt") -> str:
    """`prompt`, unchanged, if it can describe a video: valid UTF-8 with something besides spaces and control
    characters. `what` names it in the error (`the prompt`, `prompts.txt line 3`)."""
    for index, char in enumerate(prompt):
        if (byte := _escaped_byte(char)) is not None:
            raise InputError(f"{what} is not valid UTF-8 (byte 0x{byte:02x} at character {index + 1} of "
                             f"{shown(prompt)}): give the prompt as UTF-8 text")
    if not visible(prompt):
        detail = f" (only control characters: {shown(prompt)})" if prompt.strip() else ""
        raise InputError(f"{what} is empty{detail}: describe the video to generate")
    return prompt


def read_text(path: Path) -> str:
    """The UTF-8 text of a file someone pointed show1 at (a leading BOM dropped); an unreadable file or bytes that
    are not UTF-8 are an InputError naming the file (and the line of the first bad byte)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a folder, not a text file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}: line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x}): save the file as "
                         f"UTF-8 text") from None


def check_seed(seed: int, what: str = "--seed", count: int = 1) -> int:
    """`seed`, if it and the seeds of the `count` - 1 videos after it (seed + 1, …) are seeds torch takes."""
    if seed < 0 or seed + count - 1 >= SEED_LIMIT:
        last = f" (video {count} uses seed + {count - 1})" if count > 1 and seed >= 0 else ""
        raise InputError(f"{what} {seed}: a seed is a whole number from 0 to {SEED_LIMIT - 1}{last}")
    return seed


def check_steps(steps: int, what: str = "--steps") -> int:
    """`steps`, if it is a number of denoising steps the stages can run (1 … MAX_STEPS)."""
    if not 1 <= steps <= MAX_STEPS:
        raise InputError(f"{what} {steps}: denoising steps are a whole number from 1 to {MAX_STEPS} (the "
                         f"schedulers' training timesteps)")
    return steps
