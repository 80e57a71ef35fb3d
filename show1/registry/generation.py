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
                     settings: dict[str, Any]) -> str:
    """Log a finished generation: `sources` maps stage → `name/version` (registry) or a stage folder path."""
    from mlflow.entities import Param

    client = connect(params.tracking)
    tags = {KIND_TAG: "generation", VIDEO_HASH_TAG: file_digest(video), "video_path": str(video.resolve()),
            "stages": ",".join(sources), "git_commit": git_commit()}
    prefix = "model." if from_registry else "weights."
    tags |= {f"{prefix}{stage}": source for stage, source in sources.items()}
    run = client.create_run(experiment_id(client, params.tracking), run_name="generate",
                            tags={"mlflow.runName": "generate"} | tags)
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=[Param("prompt", prompt[:6000])]
                         + [Param(k, str(v)) for k, v in settings.items()])
        client.log_artifact(run_id, str(video), "video")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
