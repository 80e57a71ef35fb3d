"""Concurrent clients of the embedded MLflow store: real processes, one sqlite file, nothing lost."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import warm
from mlflow.tracking import MlflowClient

from show1.pipelines.weights import init_weights
from show1.registry.generation import KIND_TAG, VIDEO_HASH_TAG
from show1.store import connect, sqlite_path

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 8


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_eight_generate_processes_at_once_record_eight_runs(tmp_path):
    weights = init_weights(tmp_path / "weights", "tiny", stages=["base"])["base"].parent
    # No store yet: the eight processes also race to create it.
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    processes = [warm.Popen(
        [sys.executable, "-m", "show1.cli", "generate", f"a paper boat number {i}", "--weights-dir", str(weights),
         "--stages", "base", "--steps", "1", "--seed", str(i), "--out", str(tmp_path / f"{i}.mp4")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(CLIENTS)]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=900)[0])
        finally:
            process.kill()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        assert "database is locked" not in output and "Traceback" not in output, output[-3000:]

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`{KIND_TAG}` = 'generation'")
    assert len(runs) == CLIENTS
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert sorted(run.data.params["prompt"] for run in runs) == sorted(f"a paper boat number {i}"
                                                                       for i in range(CLIENTS))
    assert all(run.data.tags[VIDEO_HASH_TAG] for run in runs)
    assert {(run.data.params["sampling.seeding"], run.data.params["sampling.final_sigmas_type"]) for run in runs} \
        == {("reference", "sigma_min")}  # the sampling settings are part of every generation run
    assert len(client.search_experiments()) == 2  # Default and show1: the racing processes made one experiment


def test_a_new_store_uses_write_ahead_logging(tmp_path, monkeypatch):
    from show1.config import Tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    connect(Tracking())
    db = sqlite_path(os.environ["MLFLOW_TRACKING_URI"])
    assert db is not None
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()
