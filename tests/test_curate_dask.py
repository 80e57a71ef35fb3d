"""Curation on a Dask cluster (real LocalClusters of worker processes): the same bytes as the local executor, a
worker killed with SIGKILL mid-chunk loses nothing, and the CLI and the Prefect flow (prefect-dask's
DaskTaskRunner) run the chunks there when asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMALL, deep_merge

from show1.config import Executor, Params, load_params
from show1.dask_cluster import dask_client
from show1.data.curate import curate
from show1.data.executors import chunk_runner

DEMO = REPO / "data/manifests/demo.csv"
OUTPUTS = ("index.jsonl", "quarantine.jsonl")


def _params(folder: Path, executor: dict | None = None) -> Params:
    """conftest's small sizes over the repository's params, 2 rows per chunk: the demo's 8 rows make 4 chunks."""
    doc = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), SMALL)
    doc = deep_merge(doc, {"curate": {"rows_per_shard": 2, "executor": executor or {}},
                           "paths": {"cache": str(folder / "cache")}})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_params(folder / "params.yaml")


def same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    shards = sorted(p.name for p in (a / "shards").iterdir())
    assert shards == sorted(p.name for p in (b / "shards").iterdir())
    for shard in shards:
        assert (a / "shards" / shard).read_bytes() == (b / "shards" / shard).read_bytes(), shard


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    folder = tmp_path_factory.mktemp("local")
    params = _params(folder)
    curate(DEMO, folder / "out", params)
    return folder / "out", params


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """A LocalCluster of 2 single-threaded worker processes, shared by the tests that need no faults."""
    with dask_client(Executor(kind="dask", workers=2)) as client:
        yield client


def test_two_dask_workers_write_what_the_local_executor_writes(local_run, cluster, tmp_path) -> None:
    out, params = local_run
    workers = cluster.scheduler_info()["workers"]
    assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers.values())
    with chunk_runner(params.curate.executor.model_copy(update={"kind": "dask",
                                                                "address": cluster.scheduler.address})) as run:
        summary = curate(DEMO, tmp_path / "out", params, run_chunks=run)
    assert summary.kept_sources == 3 and summary.rejected_by_reason == {"duplicate": 1}  # the demo: 4 rows, 2 chunks
    same_outputs(out, tmp_path / "out")
    # Both workers curated chunks: the work really was spread over the two processes.
    ran = cluster.run(lambda dask_worker: len(dask_worker.state.log))
    assert all(count > 0 for count in ran.values()), ran


def test_the_cli_runs_the_chunks_on_the_cluster_at_an_address(local_run, cluster, tmp_path) -> None:
    out, _ = local_run
    result = subprocess.run(
        [sys.executable, "-m", "show1.cli", "--params", str(out.parent / "params.yaml"), "curate", str(DEMO), "--out",
         str(tmp_path / "out"),
         "--dask-address", cluster.scheduler.address, "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    same_outputs(out, tmp_path / "out")


def test_a_worker_killed_mid_chunk_loses_nothing(local_run, tmp_path, monkeypatch) -> None:
    # The first worker process to write a shard dies there (SIGKILL), before the part file commits the chunk;
    # Dask runs that chunk again on a worker that lives (the nanny starts a new process in its place).
    out, params = local_run
    marker = tmp_path / "killed"
    monkeypatch.setenv("SHOW1_FAULT", "curate.chunk.after_shard")
    monkeypatch.setenv("SHOW1_FAULT_ONCE", str(marker))
    with chunk_runner(Executor(kind="dask", workers=2)) as run:
        curate(DEMO, tmp_path / "out", params, run_chunks=run)
    assert marker.exists()  # a worker did die mid-chunk
    same_outputs(out, tmp_path / "out")
    leftovers = [p.name for folder in ("shards", "parts") for p in (tmp_path / "out" / folder).iterdir()
                 if not p.name.endswith((".safetensors", ".json"))]
    assert leftovers == []  # no half-written shard or part is left behind


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_prefect_flow_maps_the_chunks_on_a_dask_task_runner(local_run, tmp_path, prefect_home) -> None:
    out, _ = local_run
    _params(tmp_path, executor={"kind": "dask", "workers": 2})
    env = os.environ | {"PREFECT_HOME": str(prefect_home), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "flows.curate", str(DEMO), "--out", str(tmp_path / "out"), "--params",
         str(tmp_path / "params.yaml"), "--no-validate"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Creating a new Dask cluster with `distributed.deploy.local.LocalCluster`" in output, output[-4000:]
    assert output.count("Task run 'curate-chunk-") == 2  # the demo's 4 rows, 2 per chunk: 2 chunk tasks
    # The workers reported to the flow's own temporary Prefect server instead of starting one each.
    assert output.count("Starting temporary server") == 1, output[-4000:]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["chunks_skipped"] == 0
    same_outputs(out, tmp_path / "out")
