"""Faults in curation and registration: real `show1` processes killed with SIGKILL at named points (SHOW1_FAULT,
see show1/faults.py) and at random moments, then run again. Curation ends with the same bytes as an uninterrupted
run (no duplicate, no half shard); registration leaves exactly one whole version and no orphan logged model.

`SHOW1_SOAK_ROUNDS=N` (default 1) sets how many random kills each soak test makes: the on-demand soak is
`SHOW1_SOAK_ROUNDS=25 pytest tests/reliability -m soak`.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import media
import pytest
import yaml
from mlflow.tracking import MlflowClient
from processes import ROUNDS, SEED, killed_at_random, show1
from safetensors.torch import load_file
from shared_cache import new_mlflow_store

from show1.config import load_params
from show1.data.curate import curate
from show1.data.shards import ShardReader, verify_shard
from show1.pipelines.keyframes import Show1BasePipeline
from show1.pipelines.weights import init_weights
from show1.registry.register import linked_model_id
from show1.registry.resolve import parse_refs, resolve, stage_folder
from show1.weight_files import check_folder

# ------------------------------------------------------------------------------------------------ curation


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, write_params) -> dict[str, Path]:
    """Twelve good videos and two bad rows, one row per chunk, curated once without interruption."""
    folder = tmp_path_factory.mktemp("corpus")
    rows = [{"video": media.write_video(folder / f"v{seed}.mp4", seed=seed).name, "caption": f"clip number {seed}"}
            for seed in range(12)]
    rows.insert(4, {"video": "missing.mp4", "caption": "gone"})
    rows.insert(9, {"video": media.write_zero_byte(folder / "zero.mp4").name, "caption": "empty"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_params(folder / "params", {"curate": {"rows_per_shard": 1}})
    params_file = folder / "params" / "params.yaml"
    curate(manifest, folder / "reference", load_params(params_file))
    return {"manifest": manifest, "params": params_file, "reference": folder / "reference"}


def outputs(out: Path) -> dict[str, bytes]:
    """What other tools read, with its bytes (summary.json differs only in chunks_skipped)."""
    files = [out / "index.jsonl", out / "quarantine.jsonl", *sorted((out / "shards").iterdir()),
             *sorted((out / "parts").iterdir())]
    return {f.relative_to(out).as_posix(): f.read_bytes() for f in files}


def assert_consistent(out: Path) -> None:
    """What a killed curation may leave: committed chunks (a part file naming a whole shard) and nothing else
    that a reader would take for data."""
    for part in (out / "parts").glob("part-*.json"):
        record = json.loads(part.read_text())
        if record["shard"]:
            verify_shard(out / record["shard"])  # raises on a half-written shard
            tensors = load_file(str(out / record["shard"]))
            assert {s["source_key"] for s in record["sources"]} == {name.split("/")[0] for name in tensors}


def assert_complete(out: Path, reference: Path) -> None:
    assert outputs(out) == outputs(reference)
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len({r["clip_id"] for r in index}) == len(index), "a clip appears twice"
    referenced = {json.loads(p.read_text())["shard"] for p in (out / "parts").glob("part-*.json")}
    assert {f"shards/{p.name}" for p in (out / "shards").iterdir()} == referenced - {None}
    assert [p.name for p in out.rglob("*") if ".tmp-" in p.name] == []


@pytest.mark.parametrize("fault", ["curate.chunk.after_shard@3", "curate.before_finalize"])
def test_curation_killed_at_a_commit_point_reruns_to_the_uninterrupted_bytes(corpus, tmp_path, fault):
    out = tmp_path / "out"
    killed = show1(corpus["params"], "curate", str(corpus["manifest"]), "--out", str(out), "--quiet", fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "index.jsonl").exists()
    parts = sorted(p.name for p in (out / "parts").glob("part-*.json"))
    if fault.startswith("curate.chunk.after_shard"):
        # The third shard was written, its part file (the commit) was not: a half-committed chunk.
        assert list((out / "shards").glob("shard-00002-*.safetensors")) and "part-00002.json" not in parts
    assert_consistent(out)
    rerun = show1(corpus["params"], "curate", str(corpus["manifest"]), "--out", str(out), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert_complete(out, corpus["reference"])


def published(out: Path) -> dict[str, bytes]:
    """The curation a reader sees: index, quarantine and summary, and every shard the index reads, with its bytes.
    Every clip the index lists loads from its shard."""
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    shards = sorted({row["shard"] for row in index})
    for shard in shards:
        verify_shard(out / shard)
        reader = ShardReader(out)
        for row in (r for r in index if r["shard"] == shard):
            for size in row["resolutions"]:
                frames = reader.frames(shard, f"{row['tensor']}/{size}", row["frame_start"], row["num_frames"])
                assert len(frames) == row["num_frames"], (shard, row["clip_id"])
    return {name: (out / name).read_bytes() for name in ("index.jsonl", "quarantine.jsonl", "summary.json", *shards)}


@pytest.fixture(scope="module")
def reordered(corpus, tmp_path_factory) -> dict[str, Path]:
    """The corpus's rows in reverse order (every chunk holds another row now), curated once without interruption."""
    folder = corpus["manifest"].parent
    rows = corpus["manifest"].read_text().splitlines(keepends=True)
    manifest = folder / "reordered.jsonl"
    manifest.write_text("".join(reversed(rows)))
    reference = tmp_path_factory.mktemp("reordered") / "reference"
    curate(manifest, reference, load_params(corpus["params"]))
    return {"manifest": manifest, "reference": reference}


@pytest.mark.parametrize("fault", ["curate.chunk.after_shard@3", "curate.before_finalize",
                                   "curate.publish.before_commit", "curate.publish.after_commit"])
def test_a_curation_killed_anywhere_leaves_the_one_it_replaces_whole(corpus, reordered, tmp_path, fault):
    out = tmp_path / "out"
    shutil.copytree(corpus["reference"], out)
    before = published(out)
    killed = show1(corpus["params"], "curate", str(reordered["manifest"]), "--out", str(out), "--quiet", fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert published(out) == before  # a reader still sees the previous curation, every clip of it readable
    rerun = show1(corpus["params"], "curate", str(reordered["manifest"]), "--out", str(out), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert_complete(out, reordered["reference"])  # and the shards and parts the old index read are gone
    assert not (out / "publish").exists() or not any((out / "publish").iterdir())


def test_a_refused_curation_leaves_the_one_it_replaces_whole(corpus, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(corpus["reference"], out)
    before = published(out)
    folder = corpus["manifest"].parent
    bad = folder / "all-bad.jsonl"  # files that exist, every one rejected by curation
    bad.write_text(json.dumps({"video": "zero.mp4", "caption": "empty"}) + "\n"
                   + json.dumps({"video": "missing.mp4", "caption": "gone"}) + "\n")
    refused = show1(corpus["params"], "curate", str(bad), "--out", str(out), "--quiet")
    assert refused.returncode == 1, refused.stderr
    message = " ".join(refused.stderr.split())
    assert "nothing valid remains" in message and "the curation already there is unchanged" in message, message
    assert str(out / "refused" / "quarantine.jsonl") in message and "Traceback" not in refused.stderr
    assert published(out) == before
    assert [q["reason"] for q in map(json.loads, (out / "refused/quarantine.jsonl").read_text().splitlines())] == [
        "empty_file", "missing_file"]
    # The next curation that keeps something replaces it, and clears the refusal.
    again = show1(corpus["params"], "curate", str(corpus["manifest"]), "--out", str(out), "--quiet")
    assert again.returncode == 0, again.stderr
    assert_complete(out, corpus["reference"]) and not list((out / "refused").glob("*"))


@pytest.mark.soak
def test_curation_killed_at_random_moments_completes_with_nothing_lost_or_doubled(corpus, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "out"
    script = ("import sys, time\nfrom show1.config import load_params\nfrom show1.data.curate import curate\n"
              "params = load_params(sys.argv[3])\nprint('ready', flush=True)\n"
              "curate(sys.argv[1], sys.argv[2], params, on_row=lambda: time.sleep(0.03))\n")
    argv = [sys.executable, "-c", script, str(corpus["manifest"]), str(out), str(corpus["params"])]
    kills = 0
    for _ in range(ROUNDS):
        if killed_at_random(argv, rng, "ready", window_s=0.8) is None:
            kills += 1
            assert_consistent(out)
    assert kills, "every run finished before its kill"
    rerun = show1(corpus["params"], "curate", str(corpus["manifest"]), "--out", str(out), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert_complete(out, corpus["reference"])


# -------------------------------------------------------------------------------------------- registration


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    return init_weights(tmp_path_factory.mktemp("stage"), "tiny", stages=["base"], seed=5)["base"]


def registry_state(store: str) -> dict:
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    versions = client.search_model_versions("name = 'show1-base'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    logged = client.search_logged_models(experiments)
    return {"versions": versions, "logged": logged, "client": client}


def assert_one_whole_version(store: str, params_file: Path, monkeypatch) -> None:
    after = registry_state(store)
    [version] = after["versions"]
    assert {"content_hash", "stage", "source_folder", "profile"} <= set(version.tags)
    assert after["client"].get_model_version_by_alias("show1-base", "challenger").version == version.version
    assert [m.model_id for m in after["logged"]] == [linked_model_id(version)], (
        f"an orphan logged model is left: {[(m.model_id, m.status) for m in after['logged']]}, "
        f"version {version.source}")
    # The version is whole: it downloads, its seal matches, and it loads.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    params = load_params(params_file)
    folder = stage_folder(resolve(params, parse_refs("base=challenger", ("base",)))["base"], params.paths.cache)
    assert check_folder(folder, sealed=True)
    Show1BasePipeline.from_pretrained(folder)


@pytest.mark.parametrize("fault", ["register.after_logged_model", "register.after_upload", "register.after_version"])
def test_registration_killed_at_any_step_leaves_one_whole_version_and_no_orphan(stage, tmp_path, fault,
                                                                                 monkeypatch, shared):
    store = new_mlflow_store(shared, tmp_path / "mlflow.db")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"paths": {"cache": str(tmp_path / "cache")}}))
    scratch = tmp_path / "scratch"  # the processes' temporary folder
    scratch.mkdir()
    env = {"MLFLOW_TRACKING_URI": store, "TMPDIR": str(scratch)}
    killed = show1(params_file, "register", "--stage", "base", "--checkpoint", str(stage), fault=fault, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = registry_state(store)
    assert len(before["versions"]) == (1 if fault == "register.after_version" else 0)
    # Killed while its work folder (the assembled model) existed, it left that folder behind.
    assert len(list(scratch.glob("show1-register-*"))) == (0 if fault == "register.after_version" else 1)

    again = show1(params_file, "register", "--stage", "base", "--checkpoint", str(stage), env=env)
    assert again.returncode == 0, again.stderr
    assert_one_whole_version(store, params_file, monkeypatch)
    assert list(scratch.iterdir()) == []  # the next registration removed it


@pytest.mark.soak
def test_registration_killed_at_random_moments_leaves_one_whole_version(stage, tmp_path, monkeypatch, shared):
    rng = random.Random(SEED)
    store = new_mlflow_store(shared, tmp_path / "mlflow.db")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"paths": {"cache": str(tmp_path / "cache")}}))
    argv = [sys.executable, "-m", "show1.cli", "--params", str(params_file), "register", "--stage", "base",
            "--checkpoint", str(stage)]
    for _ in range(ROUNDS):  # a registration takes about 5 s here, imports included
        killed_at_random(argv, rng, None, window_s=7.0, env={"MLFLOW_TRACKING_URI": store})
    again = show1(params_file, "register", "--stage", "base", "--checkpoint", str(stage),
                  env={"MLFLOW_TRACKING_URI": store})
    assert again.returncode == 0, again.stderr
    assert_one_whole_version(store, params_file, monkeypatch)


STORE_SCRIPT = """import sys
from show1.config import Tracking
from show1.store import connect, experiment_id
tracking = Tracking(uri=f"sqlite:///{sys.argv[1]}")
print("ready", flush=True)
print("experiment", experiment_id(connect(tracking), tracking), flush=True)
"""


@pytest.mark.soak
def test_a_store_whose_creation_is_killed_opens_on_the_next_run(tmp_path):
    """MLflow migrates a new sqlite store in place; killed midway, the file used to stay half-built (`table
    secrets already exists` for every later run, found by the registration soak). show1 builds it aside."""
    rng = random.Random(SEED)
    db = tmp_path / "mlflow.db"
    argv = [sys.executable, "-c", STORE_SCRIPT, str(db)]
    for _ in range(max(ROUNDS, 3)):
        killed_at_random(argv, rng, "ready", window_s=2.5)
        assert not db.exists() or db.stat().st_size > 0
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0 and "experiment 1" in finished.stdout, finished.stderr
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_half_built_store_is_one_clear_error(tmp_path, monkeypatch):
    import sqlite3

    from show1.config import Tracking
    from show1.store import StoreError, connect

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as connection:  # what an interrupted in-place migration leaves
        connection.execute("CREATE TABLE secrets (id INTEGER)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(StoreError, match=r"cannot be opened: .*already exists.*move .*mlflow.db aside"):
        connect(Tracking(uri=f"sqlite:///{db}"))
