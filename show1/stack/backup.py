"""`show1 stack backup|restore`: a running stack's databases and bucket in one folder, and back onto a stack.

A backup folder holds `postgres/mlflow.dump` and `postgres/prefect.dump` (`pg_dump`'s custom format: MLflow's
runs, registered models, versions, aliases and tags; the Prefect server's flows, deployments, flow runs, artifacts
and automations), `s3/` (every object of the bucket, under its key: MLflow's artifacts, a DVC remote) and
`manifest.json` (when, from which stack, the versions of show1, PostgreSQL, MLflow and Prefect, and each file's size
and sha256). It is written in a folder beside its place and renamed there whole: a backup folder is complete or
absent.

The servers keep running during a backup. The databases are dumped first, each one consistent snapshot, then the
bucket is copied: every artifact the snapshots name was in the bucket before the copy began (MLflow uploads a
model's files before it records the version). Objects written while the backup runs may or may not be in it.

A restore goes onto a running stack that holds nothing yet (after `stack down --purge` and `stack up`): it checks
every file against the manifest before it writes anything, then, with the MLflow and Prefect servers and the
workers stopped (they hold connections and caches that must not see the databases half replaced), replaces both
databases (`pg_restore --clean`, one transaction each), uploads the objects and starts the servers again on their
own ports.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from show1 import __version__, atomic
from show1.provenance import file_digest
from show1.stack import object_store, postgres
from show1.stack.processes import StackError, is_running
from show1.stack.stack import StackState, paused, read_state

FORMAT = "show1-stack-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OBJECTS = "s3"  # the bucket's objects, each under its key


def dump_path(database: str) -> str:
    return f"postgres/{database}.dump"


def backup(folder: Path, target: Path, overwrite: bool = False,
           say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Back up the running stack in `folder` into the folder `target` (absent or empty; with `overwrite`, a backup
    already there is replaced). Returns the manifest."""
    state = _running(folder)
    target = Path(target).absolute()
    _check_target(target, overwrite)
    port, endpoint = state.ports["postgres"], state.url("s3")
    say(f"backing up the stack in {state.folder} into {target}")
    with atomic.folder_in_place(target) as staging:
        (staging / "postgres").mkdir()
        for database in postgres.DATABASES:
            postgres.dump(port, database, staging / dump_path(database), state.pgpass())
            say(f"dumped the {database} database ({_size((staging / dump_path(database)).stat().st_size)})")
        count = object_store.save(endpoint, staging / OBJECTS, state.bucket)
        say(f"copied {count} objects of s3://{state.bucket}")
        files = {name: {"size": path.stat().st_size, "sha256": file_digest(path)}
                 for name, path in _files(staging).items()}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "show1_version": __version__,
            "versions": {"postgresql": postgres.server_version(port, state.pgpass()), **{
                package: metadata.version(package) for package in ("mlflow", "prefect")}},
            "stack": {"folder": state.folder, "host": state.host, "ports": state.ports, "bucket": state.bucket},
            "databases": {database: dump_path(database) for database in postgres.DATABASES},
            "objects": count,
            "files": files,
        }
        atomic.write_json(staging / MANIFEST, manifest)
    say(f"wrote {target}: {len(postgres.DATABASES)} databases, {count} objects, "
        f"{_size(sum(f['size'] for f in files.values()))}")
    return manifest


def verify(source: Path) -> dict[str, Any]:
    """The manifest of the backup in `source`, once every file it lists is there with its size and sha256 and no
    other file is; otherwise an error that names the first file that is not."""
    manifest = read_manifest(source)
    listed, present = manifest["files"], _files(source)
    for name in sorted(set(listed) | set(present)):
        path = source / name
        if name not in present:
            raise StackError(f"the backup in {source} is damaged: {path} is missing")
        if name not in listed:
            raise StackError(f"the backup in {source} is damaged: {path} is not in its {MANIFEST}")
        if path.stat().st_size != listed[name]["size"] or file_digest(path) != listed[name]["sha256"]:
            raise StackError(f"the backup in {source} is damaged: {path} does not match its checksum in {MANIFEST}")
    return manifest


def read_manifest(source: Path) -> dict[str, Any]:
    """The manifest of the backup in `source`, checked for form (not yet against the files)."""
    source = Path(source)
    if not source.is_dir():
        raise StackError(f"the backup folder {source} does not exist")
    path = source / MANIFEST
    if not path.is_file():
        raise StackError(f"{source} is not a show1 stack backup: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StackError(f"the backup in {source} is damaged: {path} is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StackError(f"{source} is not a show1 stack backup: {path} is not a show1 backup manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StackError(f"{path} is of backup format {manifest.get('format_version')!r}; this show1 "
                         f"({__version__}) reads format {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
            for f in files.values()):
        raise StackError(f"the backup in {source} is damaged: {path} has no list of files with their checksums")
    missing = [dump_path(database) for database in postgres.DATABASES if dump_path(database) not in files]
    if missing:
        raise StackError(f"the backup in {source} is incomplete: its {MANIFEST} lists no {missing[0]}")
    return manifest


def restore(folder: Path, source: Path, force: bool = False, timeout: float = 300.0,
            say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Restore the backup in `source` onto the running stack in `folder`, which must hold no MLflow runs or
    registered models and no objects (`force`: replace what it holds). Returns the backup's manifest."""
    source = Path(source).absolute()
    read_manifest(source)  # a folder that is no backup is refused before the stack is looked at
    state = _running(folder)
    port, endpoint = state.ports["postgres"], state.url("s3")
    if not force:
        _check_empty(state, port, endpoint)
    manifest = verify(source)
    for database in postgres.DATABASES:
        postgres.check_dump(source / dump_path(database))
    say(f"checked the {len(manifest['files'])} files of {source} against its {MANIFEST}")
    for package in ("mlflow", "prefect"):
        made_with, here = manifest.get("versions", {}).get(package), metadata.version(package)
        if made_with and made_with != here:
            say(f"warning: the backup was made with {package} {made_with}, this stack runs {here}: its server "
                f"upgrades or refuses the restored database")
    with paused(Path(state.folder), timeout, say):
        for database in postgres.DATABASES:
            postgres.restore(port, database, source / dump_path(database), state.pgpass())
            say(f"restored the {database} database")
        count = object_store.load(endpoint, source / OBJECTS, state.bucket)
        say(f"uploaded {count} objects into s3://{state.bucket}")
    return manifest


def _running(folder: Path) -> StackState:
    """The stack in `folder`, whose PostgreSQL and S3 store (all a backup or restore reads and writes) run."""
    folder = Path(folder).absolute()
    state = read_state(folder)
    if state is None:
        raise StackError(f"no stack runs in {folder} (show1 stack up --dir {folder})")
    stopped = [name for name in ("postgres", "s3") if name not in state.services or
               not is_running(state.services[name])]
    if stopped:
        raise StackError(f"the stack in {folder} is not running ({', '.join(stopped)} stopped): "
                         f"show1 stack up --dir {folder}")
    return state


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise StackError(f"{target} is a file, not a folder to write a backup into")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise StackError(f"{target} exists and is not empty: choose a new folder, or --overwrite to replace the "
                             "backup in it")
        try:
            read_manifest(target)
        except StackError:
            raise StackError(f"{target} is not a show1 stack backup: --overwrite replaces a backup, never another "
                             "folder") from None


def _check_empty(state: StackState, port: int, endpoint: str) -> None:
    import psycopg

    held = []
    with psycopg.connect(postgres.url(port, "mlflow", passfile=state.pgpass()), connect_timeout=30) as connection:
        for table, what in (("runs", "runs"), ("registered_models", "registered models")):
            try:
                count = connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            except psycopg.errors.UndefinedTable:  # the MLflow server has not made its tables yet
                connection.rollback()
                count = 0
            if count:
                held.append(f"MLflow {what} ({count})")
    if not object_store.is_empty(endpoint, state.bucket):
        held.append(f"objects in s3://{state.bucket}")
    if held:
        raise StackError(f"the stack in {state.folder} is not empty (it holds {', '.join(held)}): restore onto a "
                         f"fresh stack (show1 stack down --purge, then show1 stack up), or --force to replace them")


def _files(root: Path) -> dict[str, Path]:
    """Every file under `root` but the manifest, by its path relative to `root`."""
    return {path.relative_to(root).as_posix(): path for path in sorted(root.rglob("*"))
            if path.is_file() and path != root / MANIFEST}


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
