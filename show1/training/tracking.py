"""MLflow tracking of training runs: params, per-step metrics, and lineage tags (stage, commit, data version)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from show1.config import Params, apply_offline_env, tracking_uri

RUN_ID_FILE = "mlflow_run_id"


def git_commit(cwd: Path | None = None) -> str:
    """The current commit (with `-dirty` when the tree has changes), or `unknown` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def data_version(curated_dir: Path) -> str:
    """A content hash of the curated data: sha256 of its index (which lists every clip's content hash)."""
    return hashlib.sha256((curated_dir / "index.jsonl").read_bytes()).hexdigest()


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    else:
        out[prefix] = value


class TrainingRun:
    """One MLflow run per training run folder; a resumed run continues the same MLflow run."""

    def __init__(self, params: Params, run_dir: Path, stage: str, data_dir: Path):
        apply_offline_env()
        import mlflow
        from mlflow.tracking import MlflowClient

        self.mlflow = mlflow
        uri = tracking_uri(params.tracking)
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            params.tracking.experiment, artifact_location=params.tracking.artifacts.resolve().as_uri())
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id,
                                    run_name=None if run_id else f"train-{stage}")
        if run_id is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run.info.run_id)
            flat: dict[str, Any] = {}
            _flatten("train", params.train.model_dump(mode="json"), flat)
            mlflow.log_params(flat | {"stage": stage, "profile": params.profile, "data": str(data_dir)})
            mlflow.set_tags({"stage": stage, "git_commit": git_commit(), "data_version": data_version(data_dir),
                             "run_dir": str(run_dir)})

    def log_step(self, row: dict[str, Any]) -> None:
        self.mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_artifact(self, path: Path, folder: str) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def finish(self, final: Path | None = None, status: str = "FINISHED") -> None:
        if final is not None:
            self.mlflow.set_tag("final_stage_folder", str(final))
        self.mlflow.end_run(status=status)
