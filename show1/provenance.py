"""Where a result came from: the code commit, the params that shaped it, the data it saw, the bytes it is.

These are the lineage facts show1 records on training runs and registered model versions.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable
from pathlib import Path

import yaml

from show1.config import Params

CHUNK = 1 << 20


def git_commit(cwd: Path | None = None) -> str:
    """The current commit (with `-dirty` when tracked files changed), or `unknown` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def params_hash(params: Params, stage: str | None = None) -> str:
    """sha256 of the resolved params that shape a model (profile, curate, contracts, and the training settings:
    `stage`'s own, overrides merged, when given), not of paths."""
    shaping = params.model_dump(mode="json", include={"profile", "curate", "contracts", "train", "train_per_stage"})
    if stage is not None:
        shaping.pop("train_per_stage")
        shaping["train"] = params.train_for(stage).model_dump(mode="json")
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def data_version(curated_dir: Path | str) -> str:
    """A content hash of the curated data: the sha256 of its index.jsonl (which lists every clip's content hash), as
    curation recorded it in version.json beside the index (a folder at a URL is not read whole), or computed from
    index.jsonl for a folder curated before version.json."""
    from show1.data.folder import DataFolder

    folder = DataFolder(curated_dir)
    try:
        recorded = folder.read_json("version.json")
    except (FileNotFoundError, ValueError):
        recorded = None
    if isinstance(recorded, dict) and isinstance(recorded.get("data_version"), str):
        return recorded["data_version"]
    if not folder.exists("index.jsonl"):
        raise FileNotFoundError(f"{folder.name('index.jsonl')} not found: not a curated folder (run `show1 curate`)")
    return hashlib.sha256(folder.read_bytes("index.jsonl")).hexdigest()


def dvc_data_hash(curated_dir: Path | str) -> str | None:
    """DVC's hash of the curated folder (`md5` of its out in dvc.lock) when dvc.lock describes the folder as it
    is on disk (same file count and size); None outside DVC or when the lock is stale."""
    if "://" in str(curated_dir):
        return None  # DVC tracks local folders here
    folder = Path(curated_dir).resolve()
    for root in (folder, *folder.parents):
        lock = root / "dvc.lock"
        if lock.is_file():
            break
    else:
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        relative = folder.relative_to(root).as_posix()
    except (yaml.YAMLError, ValueError, AttributeError):
        return None
    files = [p for p in folder.rglob("*") if p.is_file()]
    for stage in stages.values():
        for out in stage.get("outs", []) if isinstance(stage, dict) else []:
            if out.get("path") == relative and out.get("nfiles") == len(files) \
                    and out.get("size") == sum(p.stat().st_size for p in files):
                return str(out.get("md5") or out.get("hash") or "") or None
    return None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def digest_table_hash(digests: dict[str, str]) -> str:
    """sha256 over (name, file sha256) pairs in name order: equal for equal file sets wherever they live."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(f"{name}\0{digests[name]}\n".encode())
    return digest.hexdigest()


def tree_digest(files: Iterable[tuple[str, Path]], known: dict[str, str] | None = None) -> str:
    """`digest_table_hash` of `files`; a name in `known` (sha256 already verified, e.g. from a checked seal) is
    not read again."""
    known = known or {}
    return digest_table_hash({name: known.get(name) or file_digest(path) for name, path in files})


def folder_files(folder: Path, prefix: str = "") -> list[tuple[str, Path]]:
    """Every file under `folder` as (prefix + relative posix name, path), for `tree_digest`."""
    folder = Path(folder)
    return [(prefix + p.relative_to(folder).as_posix(), p) for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]
