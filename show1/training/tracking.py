"""MLflow tracking of training runs: params, per-step metrics, and lineage tags (stage, commit, data and
params versions, the text encoder and the embeddings it made).

A run folder records the run it was tracked as (`mlflow_run_id`) and what was logged to it (`mlflow_run.json`: the
store, params and tags). So a folder trained against one store can be used with another (the demo trained on the
sqlite store, then a team's tracking server): `run_in_store` logs the training into that store as a copy, tagged
with the run it copies, and finds that copy again by the tag. The folder itself is never changed by a copy (it is a
DVC output of the train stage).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from show1 import atomic
from show1.config import Params, Train, tracking_uri
from show1.provenance import data_version, dvc_data_hash, git_commit, params_hash
from show1.registry.init_source import InitSource
from show1.store import connect, experiment_id, sqlite_path
from show1.training.runs import METRICS

RUN_ID_FILE = "mlflow_run_id"  # the run id alone, as older show1 versions read it
RUN_FILE = "mlflow_run.json"  # {store, run_id, params, tags}: what the training logged, to log it into another store
COPIED_FROM_TAG, COPIED_FROM_STORE_TAG = "show1.copied_from", "show1.copied_from_store"
MLFLOW_BATCH = 1000  # metrics per log_batch call (MLflow's limit); params go 100 at a time


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    else:
        out[prefix] = value


def store_key(uri: str) -> str:
    """A tracking URI as the run folder records it: a sqlite store by its absolute path (the URI may be relative)."""
    db = sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None else uri.rstrip("/")


def training_run_id(run_dir: Path) -> str | None:
    """The MLflow run id a training run folder was tracked under (in the store it was trained with), if it was.
    `run_in_store` gives its run in another store."""
    id_file = Path(run_dir) / RUN_ID_FILE
    if not id_file.is_file():
        return None
    return id_file.read_text().strip() or None


def logged_run(run_dir: Path) -> dict[str, Any] | None:
    """What the training logged (`mlflow_run.json`: store, run_id, params, tags); None for a folder trained by a show1
    that did not record it."""
    record = Path(run_dir) / RUN_FILE
    return json.loads(record.read_text()) if record.is_file() else None


class NotInStore(LookupError):
    """A run folder's training run is in another MLflow store and cannot be logged into this one: the folder does not
    record what its training logged (trained by an older show1). The message says which run and store."""


@dataclass(frozen=True)
class StoreRun:
    """A run folder's training run in the current store."""

    run_id: str
    copied_from: str | None = None  # set when it was logged into this store just now: the run it copies
    source_store: str | None = None
    store: str = ""

    def note(self, run_dir: Path) -> str | None:
        """One line saying what was copied, or None when nothing was."""
        if self.copied_from is None:
            return None
        return (f"the training run {self.copied_from} of {run_dir} (tracked in {self.source_store}) is not in "
                f"{self.store}: copied it there as run {self.run_id} (tag {COPIED_FROM_TAG})")


def run_in_store(params: Params, run_dir: Path) -> StoreRun | None:
    """The training run of `run_dir` in the current store (params.tracking, or MLFLOW_TRACKING_URI): the run it
    records, when that store holds it; else its copy there, logged now when there is none yet (the params and tags the
    training logged, the per-step metrics of metrics.jsonl, and `show1.copied_from`/`show1.copied_from_store` naming
    the run copied). None when the folder was never tracked. Raises NotInStore when the run is elsewhere and the
    folder does not record what was logged."""
    run_dir = Path(run_dir)
    source = training_run_id(run_dir)
    if source is None:
        return None
    client = connect(params.tracking)
    store = store_key(tracking_uri(params.tracking))
    if _in_store(client, source):
        return StoreRun(source, store=store)
    experiment = experiment_id(client, params.tracking)
    copies = client.search_runs([experiment], filter_string=f"tags.`{COPIED_FROM_TAG}` = '{source}'",
                                max_results=1)
    if copies:
        return StoreRun(copies[0].info.run_id, store=store)
    record = logged_run(run_dir)
    source_store = (record or {}).get("store") or "an unknown store"
    if record is None or record.get("run_id") != source:
        raise NotInStore(f"its training run {source} is not in the store {store}, and {run_dir} does not record what "
                         "was logged to it (trained by an older show1), so it cannot be copied there")
    copy = _copy(client, experiment, run_dir, record, source_store)
    return StoreRun(copy, copied_from=source, source_store=source_store, store=store)


def _in_store(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False
        raise  # the store failed: not an answer
    return run.info.lifecycle_stage != "deleted"


def _copy(client: Any, experiment: str, run_dir: Path, record: dict[str, Any], source_store: str) -> str:
    """Log the training recorded in `run_dir` as a new run of `experiment`; returns its id. The copy tags come last:
    a copy cut short (killed, a store that fails midway) is not found as one, and the next use copies again."""
    import time

    from mlflow.entities import Metric, Param

    tags = {key: str(value) for key, value in record["tags"].items()}
    run = client.create_run(experiment, run_name=f"train-{tags.get('stage', run_dir.name)}", tags=tags)
    run_id = run.info.run_id
    try:
        params = [Param(key, str(value)) for key, value in record["params"].items()]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start:start + 100])
        now = int(time.time() * 1000)
        rows = atomic.read_jsonl(run_dir / METRICS) if (run_dir / METRICS).is_file() else []
        metrics = [Metric(key, float(value), now, int(row["step"]))
                   for row in rows for key, value in row.items() if key != "step"]
        for start in range(0, len(metrics), MLFLOW_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + MLFLOW_BATCH])
        final = run_dir / "final"
        if final.is_dir():
            client.set_tag(run_id, "final_stage_folder", str(final.resolve()))
        client.set_tag(run_id, COPIED_FROM_STORE_TAG, source_store)
        client.set_tag(run_id, COPIED_FROM_TAG, record["run_id"])
        client.set_terminated(run_id, "FINISHED" if final.is_dir() else "KILLED")
    except BaseException:
        with contextlib.suppress(Exception):  # a store that failed midway may refuse this too: the error that counts
            client.delete_run(run_id)          # is the one above (and an untagged run is never taken for a copy)
        raise
    return run_id


def _last_step(client: Any, run_id: str, key: str) -> int:
    """The last step of `key` the run holds (0 when none): MLflow keeps each metric's latest point on the run."""
    latest = [metric.step for metric in client.get_run(run_id).data.to_proto().metrics if metric.key == key]
    return max(latest, default=0)


class TrainingRun:
    """One MLflow run per training run folder; a resumed run continues the same MLflow run (in another store than
    the one it started in: its copy there, see `run_in_store`)."""

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
        try:
            found = run_in_store(params, run_dir)
        except NotInStore:  # an older folder tracked elsewhere, resumed here: a new run in this store
            found = None
        run_id = found.run_id if found else None
        self.run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id(client, params.tracking),
                                    run_name=None if run_id else f"train-{stage}")
        # A run killed after logging steps past its last checkpoint recomputes them on resume (the same values): they
        # are logged once, so each step has one point in MLflow.
        self.logged_through = _last_step(client, run_id, "loss") if run_id else 0
        if run_id is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            flat: dict[str, Any] = {}
            _flatten("train", (cfg or params.train_for(stage)).model_dump(mode="json"), flat)
            if init is not None:
                flat["init_from"] = init.reference
            flat |= {"stage": stage, "profile": params.profile, "data": str(data_dir),
                     "text_encoder": str(Path(text_encoder).resolve()), "world_size": world_size,
                     "sharding": sharding} | (text or {})
            mlflow.log_params(flat)
            tags = {"show1.kind": "training", "stage": stage, "git_commit": git_commit(),
                    "data_version": data_version(data_dir), "params_hash": params_hash(params, stage),
                    "run_dir": str(Path(run_dir).resolve())} | (init.tags() if init else {})
            if text and "text_encoder_key" in text:  # copied onto the registered versions (lineage)
                tags["text_encoder_key"] = text["text_encoder_key"]
            dvc_hash = dvc_data_hash(data_dir)
            if dvc_hash:
                tags["data_dvc_md5"] = dvc_hash
            mlflow.set_tags(tags)
            new_id = self.run.info.run_id
            atomic.write_json(run_dir / RUN_FILE, {"store": store_key(tracking_uri(params.tracking)),
                                                   "run_id": new_id, "params": flat, "tags": tags})
            atomic.write_text(run_dir / RUN_ID_FILE, new_id)

    def log_step(self, row: dict[str, Any]) -> None:
        """Log one metrics row, unless the run already holds its step (logged before a resume)."""
        if row["step"] <= self.logged_through:
            return
        self.mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_artifact(self, path: Path, folder: str) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def finish(self, final: Path | None = None, status: str = "FINISHED") -> None:
        if final is not None:
            self.mlflow.set_tag("final_stage_folder", str(Path(final).resolve()))
        self.mlflow.end_run(status=status)
