"""MLflow tracking of training runs: params, per-step metrics, and lineage tags (stage, commit, data and
params versions, the text encoder and the embeddings it made)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from show1.config import Params, Train
from show1.provenance import data_version, dvc_data_hash, git_commit, params_hash
from show1.registry.init_source import InitSource
from show1.store import connect, experiment_id

RUN_ID_FILE = "mlflow_run_id"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    else:
        out[prefix] = value


def training_run_id(run_dir: Path) -> str | None:
    """The MLflow run id a training run folder was tracked under, if it was."""
    id_file = Path(run_dir) / RUN_ID_FILE
    if not id_file.is_file():
        return None
    return id_file.read_text().strip() or None


class TrainingRun:
    """One MLflow run per training run folder; a resumed run continues the same MLflow run."""

    def __init__(self, params: Params, run_dir: Path, stage: str, data_dir: Path, text_encoder: Path,
                 world_size: int = 1, sharding: str = "none", text: dict[str, str] | None = None,
                 cfg: Train | None = None, init: InitSource | None = None):
        """`text`: where the captions' embeddings came from (`text_encoder_key`: the content hash of the encoder
        that made them; `text_embeddings`: the store read, or that they were embedded at start). `cfg`: the stage's
        training settings as trained (default `params.train_for(stage)`); `init`: what a fine-tuning started from
        (a registered version is recorded as the tags `fine_tuned_from` and `fine_tuned_from_hash`)."""
        import mlflow

        self.mlflow = mlflow
        client = connect(params.tracking)
        run_id = training_run_id(run_dir)
        self.run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id(client, params.tracking),
                                    run_name=None if run_id else f"train-{stage}")
        if run_id is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_ID_FILE).write_text(self.run.info.run_id)
            flat: dict[str, Any] = {}
            _flatten("train", (cfg or params.train_for(stage)).model_dump(mode="json"), flat)
            if init is not None:
                flat["init_from"] = init.reference
            mlflow.log_params(flat | {"stage": stage, "profile": params.profile, "data": str(data_dir),
                                      "text_encoder": str(Path(text_encoder).resolve()), "world_size": world_size,
                                      "sharding": sharding} | (text or {}))
            tags = {"show1.kind": "training", "stage": stage, "git_commit": git_commit(),
                    "data_version": data_version(data_dir), "params_hash": params_hash(params, stage),
                    "run_dir": str(Path(run_dir).resolve())} | (init.tags() if init else {})
            if text and "text_encoder_key" in text:  # copied onto the registered versions (lineage)
                tags["text_encoder_key"] = text["text_encoder_key"]
            dvc_hash = dvc_data_hash(data_dir)
            if dvc_hash:
                tags["data_dvc_md5"] = dvc_hash
            mlflow.set_tags(tags)

    def log_step(self, row: dict[str, Any]) -> None:
        self.mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_artifact(self, path: Path, folder: str) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def finish(self, final: Path | None = None, status: str = "FINISHED") -> None:
        if final is not None:
            self.mlflow.set_tag("final_stage_folder", str(Path(final).resolve()))
        self.mlflow.end_run(status=status)
