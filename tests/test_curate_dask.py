"""Curation on a Dask cluster (real LocalClusters of worker processes): the same bytes as the local executor, a
worker killed with SIGKILL mid-chunk loses nothing, the CLI and the Prefect flow (prefect-dask's
DaskTaskRunner) run the chunks there when asked, and the workers write to an S3 store (the stack's, moto) given
as an fsspec URL, reaching it the way workers on other machines would: through AWS_ENDPOINT_URL and keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMALL, deep_merge
from services import s3_store

from show1.config import Executor, Params, load_params
from show1.dask_cluster import dask_client
from show1.data.contracts import validate_data
from show1.data.curate import NothingKept, curate
from show1.data.executors import chunk_runner
from show1.stack import object_store

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
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The stack's S3 server. Its endpoint and keys are in this module's environment, so the Dask workers started
    after it, and the CLI, find the store only through the environment."""
    with s3_store(tmp_path_factory.mktemp("s3")) as endpoint, pytest.MonkeyPatch.context() as env:
        for name, value in object_store.client_env(endpoint).items():
            env.setenv(name, value)
        yield endpoint


@pytest.fixture(scope="module")
def cluster(s3: str) -> Iterator[object]:
    """A LocalCluster of 2 single-threaded worker processes, shared by the tests that need no faults."""
    with dask_client(Executor(kind="dask", workers=2)) as client:
        yield client


def bucket_folder(endpoint: str, prefix: str, into: Path) -> Path:
    """The objects under `prefix`/ downloaded into a folder; every one must be an output curation writes (no
    temporary, no lock)."""
    names = [key[len(prefix) + 1:] for key in object_store.keys(endpoint, prefix=prefix + "/")]
    expected = ("index.jsonl", "index.parquet", "index.arrow", "quarantine.jsonl", "summary.json", "version.json")
    assert set(expected) <= set(names), names
    assert all(n in expected or n.startswith(("shards/shard-", "parts/part-")) for n in names), names
    object_store.save(endpoint, into)
    return into / prefix


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


def test_a_refused_run_on_the_cluster_leaves_the_curation_it_replaces_whole(local_run, cluster, tmp_path) -> None:
    out, params = local_run
    shutil.copytree(out, tmp_path / "out")
    bad = tmp_path / "bad.csv"  # every row rejected by the workers
    (tmp_path / "zero.mp4").write_bytes(b"")
    bad.write_text("video,caption\nzero.mp4,an empty file\nmissing.mp4,a missing file\n")
    executor = params.curate.executor.model_copy(update={"kind": "dask", "address": cluster.scheduler.address})
    with chunk_runner(executor) as run, pytest.raises(NothingKept, match="the curation already there is unchanged"):
        curate(bad, tmp_path / "out", params, run_chunks=run)
    same_outputs(out, tmp_path / "out")  # index, quarantine and every shard as they were
    assert (out / "summary.json").read_bytes() == (tmp_path / "out" / "summary.json").read_bytes()
    assert (tmp_path / "out" / "refused" / "quarantine.jsonl").is_file()


def test_the_cli_runs_the_chunks_on_the_cluster_at_an_address_writing_to_s3(local_run, cluster, s3, tmp_path) -> None:
    out, _ = local_run
    result = subprocess.run(
        [sys.executable, "-m", "show1.cli", "--params", str(out.parent / "params.yaml"), "curate", str(DEMO), "--out",
         "s3://show1/cli/", "--dask-address", cluster.scheduler.address, "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "index: s3://show1/cli/index.jsonl" in result.stdout
    same_outputs(out, bucket_folder(s3, "cli", tmp_path / "bucket"))
    ran = cluster.run(lambda dask_worker: len(dask_worker.state.log))
    assert all(count > 0 for count in ran.values()), ran  # both workers wrote to the store


def test_an_s3_output_resumes_and_validates_like_a_folder(local_run, s3, tmp_path) -> None:
    out, params = local_run
    first = curate(DEMO, "s3://show1/resume", params)
    assert first.out == "s3://show1/resume" and first.chunks_skipped == 0
    lost = "resume/parts/part-00001.json"  # a lost part file: its chunk is curated again, the other is skipped
    object_store.s3_client(s3).delete_object(Bucket=object_store.BUCKET, Key=lost)
    again = curate(DEMO, "s3://show1/resume", params)
    assert again.chunks_skipped == 1 and again.to_dict() | {"chunks_skipped": 0} == first.to_dict()
    same_outputs(out, bucket_folder(s3, "resume", tmp_path / "bucket"))
    report = validate_data("s3://show1/resume", params, tmp_path / "validation")
    assert report.success, report.failed_expectations()
    assert json.loads(report.result_path.read_text())["curated_dir"] == "s3://show1/resume"


def test_a_file_url_is_the_folder_it_names(local_run, tmp_path) -> None:
    out, params = local_run
    summary = curate(DEMO, f"file://{tmp_path}/out", params)
    assert summary.out == str(tmp_path / "out")
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
