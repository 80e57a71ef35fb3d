"""The MLflow store show1 tracks into: one place that connects, creates the experiment and says where
artifacts go.

Default: `sqlite:///mlruns/mlflow.db` with artifacts under `mlruns/artifacts` (params.tracking);
`MLFLOW_TRACKING_URI` overrides the URI. When the override is another sqlite file, artifacts go beside it
(`<its folder>/artifacts`), so a store in a temporary folder keeps everything there.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from show1.config import Tracking, apply_environment_defaults, show1_command, tracking_uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_location(tracking: Tracking) -> str | None:
    """Where a new experiment keeps its artifacts: params' folder for params' store, beside the db for another
    sqlite store, and the server's default for a tracking server."""
    uri = tracking_uri(tracking)
    db = sqlite_path(uri)
    if db is None:
        return None
    folder = tracking.artifacts if uri == tracking.uri else db.parent / "artifacts"
    return Path(folder).resolve().as_uri()


class StoreError(ValueError):
    """The MLflow store cannot be opened; the message says which and what to do."""


def create_sqlite_store(db: Path, artifact_root: str) -> bool:
    """Create the sqlite store `db` whole or not at all: MLflow's schema migrations run on a temporary file that
    is then linked into place. (Run in place, a process killed mid-migration leaves a half-built database that
    every later run fails on: `table ... already exists`.) Returns False when another process got there first."""
    import os
    import tempfile

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{db.name}.tmp-", dir=db.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", artifact_root)
        store.engine.dispose()
        use_write_ahead_log(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the store from the others who share it
        if db.is_file() and db.stat().st_size == 0:  # an empty file: sqlite's, killed before the first write
            db.unlink(missing_ok=True)
        try:
            os.link(tmp, db)  # atomic, and never replaces a store another process created meanwhile
        except FileExistsError:
            return False
        return True
    finally:
        for leftover in tmp.parent.glob(f"{tmp.name}*"):
            leftover.unlink(missing_ok=True)


def use_write_ahead_log(db: Path) -> None:
    """Switch the sqlite file `db` to write-ahead logging (a setting stored in the file itself).

    Concurrent clients of one embedded store (training, `show1 generate` processes, `mlflow ui`) then read while
    another writes. MLflow already waits up to 20 s for a busy database (`PRAGMA busy_timeout`), so nothing failed
    without it either: 8 processes × 600 writes at once took 35.5 s in the default journal mode, 27.0 s with WAL,
    no error in either. WAL needs a local file system (as does sqlite's locking in any mode): on a shared
    folder, use a tracking server."""
    import sqlite3

    connection = sqlite3.connect(db)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def connect(tracking: Tracking) -> Any:
    """An MlflowClient on the store (the fluent API is pointed at it too); a new sqlite store is created whole."""
    apply_environment_defaults()
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(tracking)
    db = sqlite_path(uri)
    if db is not None and (not db.is_file() or db.stat().st_size == 0):
        create_sqlite_store(db, artifact_location(tracking) or (db.parent / "artifacts").resolve().as_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # any failure here means the store is unusable: say which and why
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        hint = (f" If a run was killed while an older show1 created it, move {db} aside and run again."
                if db is not None else " Is the tracking server running?")
        raise StoreError(f"the MLflow store {uri} cannot be opened: {reason}.{hint}") from None
    return client


def experiment_id(client: Any, tracking: Tracking) -> str:
    """The id of params.tracking.experiment, created on first use (safe when two processes race to create it)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(tracking.experiment, artifact_location=artifact_location(tracking))
    except MlflowException:
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


def ui_command(tracking: Tracking) -> str:
    """The one command that opens the MLflow UI on this store, as it runs in a new shell in this folder: `show1 ui`
    (the MLflow and Prefect UIs on the project's stores; it prints their URLs) for an embedded store, with the store
    named when the environment, not params, chose it; a tracking server's own UI otherwise."""
    uri = tracking_uri(tracking)
    if sqlite_path(uri) is None:
        return f"open {uri} (the tracking server's UI)"
    store = "" if uri == tracking.uri else f"MLFLOW_TRACKING_URI={shlex.quote(uri)} "
    return f"{store}{show1_command()} ui  (the MLflow and Prefect UIs on this project's stores)"
