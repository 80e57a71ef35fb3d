"""Caption cleaning and caption rules."""

from __future__ import annotations

import html
import re
import unicodedata

import ftfy

from show1.config import CaptionRules
from show1.data.errors import Rejected

_TAG = re.compile(r"</?[A-Za-z][^<>]{0,200}>")  # a tag starts with a letter: "a < b > c" stays
_URL = re.compile(r"https?://\S+")
_SPACE = re.compile(r"\s+")


def binary_fraction(text: str) -> float:
    """Share of characters that are replacement, control or unassigned code points."""
    if not text:
        return 0.0
    bad = sum(1 for ch in text if ch == "\ufffd" or (unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn")
                                                        and ch not in "\t\n\r"))
    return bad / len(text)


def clean_caption(text: str) -> str:
    """Fix mojibake, unescape HTML, drop tags, URLs and control characters, collapse whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(_TAG.sub(" ", html.unescape(text)))
    text = _URL.sub(" ", text)
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    return _SPACE.sub(" ", text).strip()


def check_caption(raw: str | None, rules: CaptionRules) -> str:
    """Return the cleaned caption or raise `Rejected` naming the broken rule."""
    if raw is None or not raw.strip():
        raise Rejected("empty_caption", "the caption is empty")
    fraction = binary_fraction(raw)
    if fraction > rules.max_binary_fraction:
        raise Rejected("binary_caption",
                       f"{fraction:.0%} of the caption's characters are binary/control "
                       f"(limit {rules.max_binary_fraction:.0%})")
    cleaned = clean_caption(raw)
    if not cleaned:
        raise Rejected("empty_caption", f"the caption is empty after cleaning (was {raw[:60]!r})")
    if len(cleaned) < rules.min_chars:
        raise Rejected("caption_too_short", f"{len(cleaned)} characters < min_chars {rules.min_chars}")
    if len(cleaned) > rules.max_chars:
        raise Rejected("caption_too_long", f"{len(cleaned)} characters > max_chars {rules.max_chars}")
    return cleaned
