"""`show1 run`: the whole lifecycle as one Prefect flow, and a second run that redoes nothing that did not change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # the demo clips at quarter size, a few steps per stage, one prompt evaluated on two stages
    "paths": {"manifest": str(ROOT / "data/manifests/demo.csv")},
    "curate": {"clip": {"sizes": [[32, 20], [128, 80]], "stride": 8}},
    "train": {"max_steps": 2, "checkpoint_every": 2, "sample_every": 0},
    "evaluate": {"stages": ["base", "interp"], "steps": 1, "frames_per_video": 2, "max_reference_clips": 2},
}


def show1_run(project: Path, store: str) -> subprocess.CompletedProcess:
    env = os.environ | {"MLFLOW_TRACKING_URI": store, "PREFECT_HOME": str(project / "prefect-home"),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    return subprocess.run([sys.executable, "-m", "show1.cli", "--params", "params.yaml", "run", "--limit", "1"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_whole_cascade_runs_as_one_flow_and_reruns_only_what_changed(tmp_path, mlflow_store):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(SMALL))
    first = show1_run(tmp_path, mlflow_store)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output[-4000:]
    for flow in ("show1-cascade", "show1-curate", "show1-train", "show1-register", "show1-generate-evaluate",
                 "show1-promote"):
        assert f"for flow '{flow}'" in output, flow
    assert "Finished in state Completed" in output
    video = tmp_path / "eval" / "videos" / "000.mp4"
    assert video.is_file() and (tmp_path / "eval" / "report.html").is_file()
    for line in (f"video:          {video.relative_to(tmp_path)}", "report:", "MLflow UI:      mlflow ui",
                 "Prefect UI:", "lineage:        show1 lineage"):
        assert line in first.stdout, line
    client = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    for stage in ("base", "interp", "sr1", "sr2"):
        assert str(client.get_model_version_by_alias(f"show1-{stage}", "challenger").version) == "1"
    # The evaluated stages passed the gate (no champion before): they are champions now.
    assert str(client.get_model_version_by_alias("show1-base", "champion").version) == "1"
    # The video leads back to its models and their training runs.
    lineage = subprocess.run([sys.executable, "-m", "show1.cli", "--params", "params.yaml", "lineage", str(video)],
                             cwd=tmp_path, env=os.environ | {"MLFLOW_TRACKING_URI": mlflow_store},
                             capture_output=True, text=True, timeout=300)
    assert lineage.returncode == 0 and "show1-base/1" in lineage.stdout and "training run" in lineage.stdout

    second = show1_run(tmp_path, mlflow_store)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert output.count("unchanged inputs, reusing the finished run") == 4
    assert output.count("already registered as") == 4
    assert [str(v.version) for v in client.search_model_versions("name = 'show1-sr1'")] == ["1"]
