"""The MLflow store show1 tracks into: one place that connects, creates the experiment and says where
artifacts go.

Default: `sqlite:///mlruns/mlflow.db` with artifacts under `mlruns/artifacts` (params.tracking);
`MLFLOW_TRACKING_URI` overrides the URI. When the override is another sqlite file, artifacts go beside it
(`<its folder>/artifacts`), so a store in a temporary folder keeps everything there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from show1.config import Tracking, apply_offline_env, tracking_uri


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


def connect(tracking: Tracking) -> Any:
    """An MlflowClient on the store (the fluent API is pointed at it too); a sqlite store's folder is created."""
    apply_offline_env()
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(tracking)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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
    """The one command that opens the MLflow UI on this store."""
    uri = tracking_uri(tracking)
    if sqlite_path(uri) is None:
        return f"open {uri} (the tracking server's UI)"
    return f"mlflow ui --backend-store-uri {uri} --port 5000"
