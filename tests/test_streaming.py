"""Training data streamed from object storage: a curated folder uploaded to the stack's S3 server (moto), reached
through AWS_ENDPOINT_URL as a training node would, read through a data cache smaller than the data set.

Every clip read from `s3://` is the local read bit for bit; the cache never holds more than its limit; a shard
damaged in the cache is fetched again, never read; training on the URL gives the local run's losses; a training
killed with SIGKILL in the middle of a shard download resumes from a cold cache to the uninterrupted run's losses; 2
processes on streamed data take the one global batch that 1 process takes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from services import s3_store

from show1.config import DataCache, load_params
from show1.data.curate import curate
from show1.data.curated_files import CuratedFiles
from show1.data.dataset import CuratedClips
from show1.stack import object_store

ROOT = Path(__file__).resolve().parents[1]
BUCKET = object_store.BUCKET
# The demo in one shard per manifest row, so the data set is several shards and the cache can be smaller than it.
SMALL = {"curate": {"clip": {"sizes": [[32, 20], [64, 40]], "stride": 8}, "rows_per_shard": 1},
         "train": {"learning_rate": 4e-6, "batch_size": 4, "grad_accum": 2, "sample_every": 0, "keep_last": 5,
                   "loader_workers": 1, "shard_block": 1}}
STEPS, EVERY = 4, 1


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The demo curated locally, and the same folder uploaded to the S3 server; the server's endpoint and keys in
    this module's environment (and so in the processes it starts)."""
    folder = tmp_path_factory.mktemp("streaming")
    with s3_store(folder) as endpoint, pytest.MonkeyPatch.context() as env:
        for name, value in object_store.client_env(endpoint).items():
            env.setenv(name, value)
        (folder / "params.yaml").write_text(yaml.safe_dump(SMALL | {"tracking": {"uri": "sqlite:///unused.db"}}))
        params = load_params(folder / "params.yaml")
        local = folder / "curated"
        curate(ROOT / "data/manifests/demo.csv", local, params)
        client = object_store.s3_client(endpoint)
        for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != ".lock"):
            client.put_object(Bucket=BUCKET, Key=f"curated/{path.relative_to(local).as_posix()}",
                              Body=path.read_bytes())
        shards = sorted((local / "shards").glob("*.safetensors"))
        assert len(shards) >= 3, shards
        yield {"folder": folder, "params": params, "params_file": folder / "params.yaml", "local": local,
               "url": f"s3://{BUCKET}/curated", "endpoint": endpoint,
               "largest": max(p.stat().st_size for p in shards), "total": sum(p.stat().st_size for p in shards),
               "index": (local / "index.parquet").stat().st_size + (local / "index.arrow").stat().st_size}


def small_cache(data: dict) -> DataCache:
    """Room for the index and the largest shard, less than the whole data set."""
    limit = data["index"] + data["largest"] + 4096
    assert limit < data["index"] + data["total"]
    return DataCache(limit_gb=limit / 2**30, ahead=1)


def test_clips_read_from_s3_are_the_local_clips_within_the_cache_limit(data, tmp_path):
    cache_dir = tmp_path / "cache"
    files = CuratedFiles(data["url"], small_cache(data), cache_dir)
    try:
        streamed = CuratedClips(data["url"], size="64x40", split=None, files=files)
        local = CuratedClips(data["local"], size="64x40", split=None)
        assert len(streamed) == len(local) > 0
        limit = small_cache(data).limit_gb * 2**30
        for i in [*range(len(local)), *reversed(range(len(local)))]:  # every shard twice: evicted, fetched again
            mine, theirs = streamed[i], local[i]
            assert torch.equal(mine["frames"], theirs["frames"]) and mine["caption"] == theirs["caption"]
            assert tree_bytes(cache_dir) <= limit
    finally:
        files.close()


def test_a_shard_damaged_in_the_cache_is_fetched_again_never_read(data, tmp_path):
    cache_dir = tmp_path / "cache"
    local = CuratedClips(data["local"], size="32x20", split=None)
    files = CuratedFiles(data["url"], DataCache(limit_gb=1.0), cache_dir)
    try:
        CuratedClips(data["url"], size="32x20", split=None, files=files)[0]
    finally:
        files.close()
    for cached in (cache_dir / "files").glob("*.safetensors"):  # flip bytes in the middle of every cached shard
        damaged = bytearray(cached.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        cached.write_bytes(bytes(damaged))
    files = CuratedFiles(data["url"], DataCache(limit_gb=1.0), cache_dir)  # a new process's view of the cache
    try:
        streamed = CuratedClips(data["url"], size="32x20", split=None, files=files)
        for i in range(len(local)):
            assert torch.equal(streamed[i]["frames"], local[i]["frames"])
    finally:
        files.close()
    cached = {p.name.split("-", 1)[1]: p.read_bytes() for p in (cache_dir / "files").glob("*.safetensors")}
    assert cached and cached == {name: (data["local"] / "shards" / name).read_bytes() for name in cached}


def test_a_url_without_a_cache_and_a_missing_index_are_one_clear_line(data, tmp_path):
    with pytest.raises(ValueError, match="read through a data cache"):
        CuratedClips(data["url"])
    files = CuratedFiles(f"s3://{BUCKET}/nothing-here", DataCache(), tmp_path / "cache")
    try:
        with pytest.raises(FileNotFoundError, match=r"s3://.*/nothing-here/index.parquet not found: run `show1 "
                                                    r"curate MANIFEST --out s3://"):
            CuratedClips(f"s3://{BUCKET}/nothing-here", files=files)
    finally:
        files.close()


# ------------------------------------------------------------------------------------------------------ training


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("MLFLOW_TRACKING_URI", "SHOW1_FAULT", "SHOW1_FAULT_ONCE", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                 "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def params_file(data: dict, folder: Path, **train: object) -> Path:
    """The module's params with a data cache smaller than the data set (and `train` overrides), in `folder`: runs
    started there keep their cache in `folder/data/cache/streamed`, cold for each run."""
    folder.mkdir(parents=True, exist_ok=True)
    limit = small_cache(data).limit_gb
    doc = yaml.safe_load(data["params_file"].read_text())
    doc["train"] = doc["train"] | {"data_cache": {"limit_gb": limit, "ahead": 1}} | train
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def train_command(params: Path, source: str, out: Path, *extra: str, processes: int = 1) -> list[str]:
    launcher = [sys.executable, "-m"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m"]
    return [*launcher, "show1.cli", "--params", str(params), "train", "--stage", "base", "--data", source,
            "--out", str(out), "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--no-track", *extra]


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env=environment() | env)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def streamed_run(data) -> dict:
    """One training on s3:// (a loader worker, a cache smaller than the data) and the same on the local folder."""
    folder = data["folder"] / "runs"
    params = params_file(data, folder / "streamed")
    streamed = run(train_command(params, data["url"], folder / "streamed" / "run"), folder / "streamed")
    assert streamed.returncode == 0, streamed.stdout[-3000:] + streamed.stderr[-3000:]
    local = run(train_command(params, str(data["local"]), folder / "local" / "run"), folder / "streamed")
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    return {"params": params, "streamed": folder / "streamed" / "run", "local": folder / "local" / "run",
            "cache": folder / "streamed" / "data" / "cache" / "streamed"}


def test_training_on_s3_takes_the_local_batches_within_its_cache(data, streamed_run):
    assert losses(streamed_run["streamed"]) == losses(streamed_run["local"])
    assert len(losses(streamed_run["local"])) == STEPS
    cached = list((streamed_run["cache"] / "files").glob("*"))
    assert any(p.name.endswith(".safetensors") for p in cached)
    assert tree_bytes(streamed_run["cache"]) <= small_cache(data).limit_gb * 2**30


def test_training_killed_in_a_shard_download_resumes_from_a_cold_cache_to_the_same_losses(data, streamed_run):
    """SIGKILL the training process in the middle of its third shard download (after its first checkpoints), then
    resume in a fresh folder whose cache is empty: the losses of the uninterrupted run, bit for bit. No loader
    worker here: the batches are the same with any number, and the kill hits the process that owns the run."""
    folder = data["folder"] / "runs" / "killed"
    params = params_file(data, folder, loader_workers=0)
    out = folder / "run"
    killed = run(train_command(params, data["url"], out), folder, SHOW1_FAULT="train.data_cache.mid_download@4")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    done = len(losses(out)) if (out / "metrics.jsonl").exists() else 0
    assert done < STEPS
    cold = data["folder"] / "runs" / "resumed"
    cold.mkdir()
    resumed = run(train_command(params, data["url"], out, "--resume", "latest"), cold)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert losses(out) == losses(streamed_run["streamed"])


def test_two_processes_on_streamed_data_take_the_one_process_global_batch(data, streamed_run):
    folder = data["folder"] / "runs" / "two"
    folder.mkdir()
    two = run(train_command(streamed_run["params"], data["url"], folder / "run", processes=2), folder)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert losses(folder / "run") == pytest.approx(losses(streamed_run["streamed"]), rel=1e-4, abs=1e-4)
