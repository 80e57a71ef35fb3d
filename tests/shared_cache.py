"""Expensive test inputs built once per test session and shared by every test file and xdist worker.

Each input is a folder keyed by the content that defines it (a name plus a JSON-able key: params, versions): the
first worker that needs it builds it under an exclusive file lock, into a staging folder renamed into place, and
every other test reuses it. Tests copy what they write to (stores, databases) so they never see each other.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SHARED_ROOT = "show1-shared"


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test session that every xdist worker sees (the parent of the workers' own temp roots)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / SHARED_ROOT
    root.mkdir(exist_ok=True)
    return root


def cached_folder(root: Path, name: str, key: Any, build: Callable[[Path], None]) -> Path:
    """`root/<name>-<hash of key>`, made by `build(folder)` the first time it is asked for (by any worker)."""
    digest = hashlib.sha256(json.dumps([name, key], sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = root / f"{name}-{digest}"
    with open(root / f".{name}-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.is_dir():
            staging = root / f".{name}-{digest}.building"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            build(staging)
            staging.rename(folder)
    return folder


def _versions(*packages: str) -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in packages}


def _build_mlflow_store(folder: Path) -> None:
    from show1.store import create_sqlite_store

    create_sqlite_store(folder / "mlflow.db", (folder / "artifacts").as_uri())


def new_mlflow_store(root: Path, db: Path) -> str:
    """A new, empty sqlite MLflow store at `db`, made the way show1 makes one (schema migrations, WAL), copied from
    the session's template instead of migrating ~40 schema versions again (3-4 s each time)."""
    template = cached_folder(root, "mlflow-store", _versions("mlflow", "sqlalchemy"), _build_mlflow_store)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template / "mlflow.db", db)
    with sqlite3.connect(db) as connection:  # the Default experiment keeps its artifacts beside this copy
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           ((db.parent / "artifacts").resolve().as_uri(),))
    connection.close()
    return f"sqlite:///{db}"


def _build_prefect_home(folder: Path) -> None:
    env = dict(os.environ, PREFECT_HOME=str(folder), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true")
    env.pop("PREFECT_API_URL", None)
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"], env=env,
                   check=True, capture_output=True, timeout=600)


def new_prefect_home(root: Path, home: Path) -> Path:
    """A PREFECT_HOME whose database is already migrated (a copy of the session's template): a flow's temporary
    server then starts in about a second instead of migrating a new database first (~10 s, more under load)."""
    template = cached_folder(root, "prefect-home", _versions("prefect"), _build_prefect_home)
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template / "prefect.db", home / "prefect.db")
    return home
