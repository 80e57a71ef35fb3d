"""Generation runs: every `show1 generate` is an MLflow run that names the stage versions (or folders) it used
and the sha256 of the video it wrote, so `show1 lineage VIDEO` can walk back from the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from show1.config import Params
from show1.provenance import file_digest, git_commit
from show1.store import connect, experiment_id

KIND_TAG = "show1.kind"
VIDEO_HASH_TAG = "video_sha256"


def track_generation(params: Params, video: Path, prompt: str, sources: dict[str, str], from_registry: bool,
                     settings: dict[str, Any], recorded_path: Path | None = None, parent_run_id: str | None = None,
                     log_video: bool = True) -> str:
    """Log a finished generation: `sources` maps stage → `name/version` (registry) or a stage folder path.
    `recorded_path`: where the video will live when `video` is still a staging copy; `parent_run_id` nests the
    run (an evaluation's videos)."""
    from mlflow.entities import Param

    client = connect(params.tracking)
    tags = {KIND_TAG: "generation", VIDEO_HASH_TAG: file_digest(video),
            "video_path": str(Path(recorded_path or video).resolve()), "stages": ",".join(sources),
            "git_commit": git_commit(), "mlflow.runName": "generate"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    prefix = "model." if from_registry else "weights."
    tags |= {f"{prefix}{stage}": source for stage, source in sources.items()}
    run = client.create_run(experiment_id(client, params.tracking), run_name="generate", tags=tags)
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=[Param("prompt", prompt[:6000])]
                         + [Param(k, str(v)) for k, v in settings.items()])
        if log_video:
            client.log_artifact(run_id, str(video), "video")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
