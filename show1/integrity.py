"""Content hashes of weight folders. Every folder of weights show1 writes (training checkpoints, exported and
registered stage folders, `init-weights` and `convert-weights` output) is sealed with `checksums.json`: the
sha256 of each file and a content hash over them. Loading verifies the seal first, so a damaged, truncated or
swapped file is refused with its name instead of being loaded (or half-loaded) into a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from show1 import atomic
from show1.provenance import digest_table_hash, file_digest

CHECKSUMS = "checksums.json"
ALGORITHM = "sha256"


class IntegrityError(ValueError):
    """A weight folder does not match its recorded content hash; the message names the file."""


def _files(folder: Path) -> dict[str, Path]:
    """The files the seal covers: everything under `folder` except the seal itself and caches."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS and "__pycache__" not in p.parts
            and not p.name.startswith(atomic.TMP_MARK)}


def seal(folder: Path | str) -> str:
    """Write `folder/checksums.json` (atomically) and return the folder's content hash."""
    folder = Path(folder)
    digests = {name: file_digest(path) for name, path in _files(folder).items()}
    content_hash = digest_table_hash(digests)
    atomic.write_json(folder / CHECKSUMS, {"algorithm": ALGORITHM, "content_hash": content_hash, "files": digests})
    return content_hash


def read_seal(folder: Path) -> dict[str, Any] | None:
    path = folder / CHECKSUMS
    if not path.is_file():
        return None
    try:
        seal_ = json.loads(path.read_text(encoding="utf-8"))
        if seal_.get("algorithm") != ALGORITHM or not isinstance(seal_.get("files"), dict):
            raise ValueError(f"expected algorithm {ALGORITHM} and a files table")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise IntegrityError(f"{path}: unreadable seal ({exc}); the folder cannot be verified") from None
    return seal_


def verify(folder: Path | str, required: bool = False, parts: list[str] | None = None) -> str | None:
    """Check the files of `folder` against its seal; return the content hash (None: no seal, not `required`).

    With `parts` (component folder names), only those folders and the top-level files are checked: what a
    pipeline that loads just those components reads (a stage that reuses another stage's text encoder need not
    hash its own T5). Raises `IntegrityError` naming the first file that is missing, changed or not covered."""
    folder = Path(folder)
    recorded = read_seal(folder)
    if recorded is None:
        if required:
            raise IntegrityError(f"{folder}: no {CHECKSUMS}, so its content cannot be verified (a checkpoint "
                                 "show1 wrote always has one: this one is incomplete or was changed)")
        return None
    present = _files(folder)
    expected: dict[str, str] = recorded["files"]
    if parts is not None:
        def wanted(name: str) -> bool:
            return "/" not in name or name.split("/", 1)[0] in parts

        present = {name: path for name, path in present.items() if wanted(name)}
        checked = {name: digest for name, digest in expected.items() if wanted(name)}
    else:
        checked = expected
    for name, digest in sorted(checked.items()):
        if name not in present:
            raise IntegrityError(f"{folder}: {name} is missing (recorded in {CHECKSUMS}); refusing to load")
        found = file_digest(present[name])
        if found != digest:
            raise IntegrityError(f"{folder}: {name} does not match its recorded content hash (sha256 {found[:16]}…, "
                                 f"recorded {digest[:16]}…): the file is damaged or was changed; refusing to load")
    extra = sorted(set(present) - set(checked))
    if extra:
        raise IntegrityError(f"{folder}: {', '.join(extra[:5])} not covered by {CHECKSUMS} (added after the folder "
                             "was sealed); refusing to load")
    content_hash = digest_table_hash(expected)
    if recorded.get("content_hash") not in (None, content_hash):
        raise IntegrityError(f"{folder}/{CHECKSUMS}: its content hash does not match its file table; refusing to load")
    return content_hash

