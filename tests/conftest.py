"""Shared fixtures: a small params file per test and a library of real generated media."""

from __future__ import annotations

import os

# Under pytest-xdist (make test), each worker gets its share of the cores: torch's default of one thread per core
# in every worker oversubscribes the machine (sr1 training ran 6x slower). Subprocesses inherit the setting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)

# show1's CLI turns huggingface_hub's progress bars off with this variable when the hub is not imported yet, so the
# first in-process CLI test left it set in this process, and every later command inherited it: commands that
# tests/warm.py would fork started cold (another import-time environment than its server's). Set from the start, it
# is the one value of every process of the session.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import media
import pytest
import yaml
from shared_cache import SHARED_ROOT, new_mlflow_store, new_prefect_home, shared_root

from show1.config import Params, load_params
from show1.data.curate import curate

REPO = Path(__file__).resolve().parents[1]
GOOD_SEEDS = range(6)

# Small enough that a curation of a dozen 2 s, 96x64 videos runs in about a second: 8-frame clips at
# 8 fps, so each generated video (2 s at 24 fps) gives 16 sampled frames and exactly 2 clips.
SMALL: dict[str, Any] = {
    "curate": {
        "filters": {"min_width": 64, "min_height": 40},
        "clip": {"frames": 8, "fps": 8, "stride": 8, "sizes": [[32, 20], [64, 40]]},
        "rows_per_shard": 4,
        # The lossless setting: tests compare stored frames with the curated ones bit for bit (tests/test_dataset.py
        # checks the default encoding's size and PSNR).
        "encoding": {"codec": "libx264rgb", "pixel_format": "rgb24", "crf": 0},
    },
}
CLIPS_PER_GOOD_VIDEO = 2


# make test spreads test files over the cores (xdist --dist loadfile --no-loadscope-reorder), handing them out in
# collection order: the longest files go first so that no worker starts a long one when the others are nearly done.
# (xdist's default reorders files by their number of tests: the one-test DVC file ran last, alone, for 5 minutes.)
# Ordered by CPU time measured on 2 cores. Every test in them builds trained stages, registries, servers or whole
# cascades: they count as `slow`, so `make check` (-m "not slow and not soak") leaves them to `make test`.
LONGEST_FILES = ("test_cascade.py", "test_dvc.py", "test_evaluation.py", "test_stack.py", "test_store_concurrency.py",
                 "test_registry.py", "test_training_ddp.py", "test_faults_training.py", "test_pipelines.py",
                 "test_training_overfit.py", "test_pipelines_orchestration.py", "test_faults.py", "test_curate_dask.py",
                 "test_training.py", "test_ingest.py", "test_lora.py",
                 "test_sampling.py", "test_golden.py", "test_cli_generate.py", "test_first_frame.py",
                 "test_disk_full.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
    for item in items:
        if item.path.name in rank:
            item.add_marker(pytest.mark.slow)


# Disk: pyproject's tmp_path_retention_policy = "failed" removes a passing test's tmp_path, but folders that module
# and session fixtures make with tmp_path_factory.mktemp lived until the next session: registered stages, stores,
# clones and stacks summed to 19 GB on one run, and CI's disk filled part-way through. A wider fixture's folders
# (the ones that appeared under this process's temp root while it was set up, less those its own dependencies
# claimed; never the session's show1-shared) are removed when it is torn down, unless a test failed meanwhile (kept,
# as tmp_path's are, to look at).
_CLAIMED: set[Path] = set()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    if fixturedef.scope == "function":
        return (yield)
    root = request.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    before, failed, made = set(root.iterdir()), request.session.testsfailed, set()

    def remove() -> None:  # added before the fixture's own teardown, so it runs after it (stacks stopped first)
        if request.session.testsfailed == failed:
            for folder in made:  # the folders, and pytest's `<name>current` links to them
                if folder.is_symlink():
                    folder.unlink(missing_ok=True)
                else:
                    shutil.rmtree(folder, ignore_errors=True)
        _CLAIMED.difference_update(made)

    fixturedef.addfinalizer(remove)
    try:
        return (yield)
    finally:
        made.update(p for p in set(root.iterdir()) - before - _CLAIMED if p.name != SHARED_ROOT)
        _CLAIMED.update(made)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


@pytest.fixture(scope="session")
def write_params() -> Callable[..., Params]:
    """`write_params(folder, overrides)`: write folder/params.yaml (SMALL + overrides) and load it.

    The download cache goes to folder/cache, never into the repository.
    """

    def write(folder: Path, overrides: dict[str, Any] | None = None) -> Params:
        folder.mkdir(parents=True, exist_ok=True)
        doc = deep_merge(deep_merge(SMALL, {"paths": {"cache": str(folder / "cache")}}), overrides or {})
        path = folder / "params.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return load_params(path)

    return write


@pytest.fixture
def make_params(tmp_path: Path, write_params: Callable[..., Params]) -> Callable[..., Params]:
    """`make_params(overrides=None)`: the small params, written to tmp_path/params.yaml."""
    return lambda overrides=None: write_params(tmp_path, overrides)


@pytest.fixture(scope="session")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind of test video, written once per session; copy what a test needs with `stage`."""
    folder = tmp_path_factory.mktemp("media")
    files = {f"good{seed}": media.write_video(folder / f"good{seed}.mp4", seed=seed) for seed in GOOD_SEEDS}
    files |= {
        "static": media.write_static_video(folder / "static.mp4", seed=99),
        "one_frame": media.write_one_frame_video(folder / "one_frame.mp4", seed=98),
        "audio_only": media.write_audio_only(folder / "audio_only.m4a"),
        "zero_byte": media.write_zero_byte(folder / "zero_byte.mp4"),
        "text": media.write_text_as_mp4(folder / "text.mp4"),
        "truncated": media.truncate(files["good0"], folder / "truncated.mp4", 0.5),
        # A rescaled, more compressed copy of good0: a near-duplicate, not a byte copy.
        "reencoded": media.reencode(files["good0"], folder / "reencoded.mp4", crf=35, size=(128, 86)),
    }
    return files


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The manifest folder of a test (paths in its manifests resolve against it)."""
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


@pytest.fixture
def stage(library: dict[str, Path], root: Path) -> Callable[..., str]:
    """`stage(name, as_name=None)`: copy a library file into root/videos; return its manifest path."""

    def copy(name: str, as_name: str | None = None) -> str:
        target = root / "videos" / (as_name or library[name].name)
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(library[name], target)
        return target.relative_to(root).as_posix()

    return copy


@pytest.fixture
def good_videos(stage: Callable[..., str]) -> list[str]:
    """Four distinct moving videos in root/videos, as manifest paths."""
    return [stage(f"good{seed}") for seed in range(4)]


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's folder of content-keyed inputs that every test file and xdist worker shares (shared_cache)."""
    return shared_root(tmp_path_factory)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> str:
    """One new sqlite MLflow store for a whole test module: its tests track into it when the module sets
    ONE_STORE_PER_MODULE = True (what they register lives on from test to test)."""
    return new_mlflow_store(shared, tmp_path_factory.mktemp("store") / "mlflow.db")


@pytest.fixture(autouse=True)
def mlflow_store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 shared: Path) -> str:
    """Every test tracks into its own sqlite MLflow store (a new, empty one), never the repository's mlruns/; or,
    in a module that sets ONE_STORE_PER_MODULE, into the module's `store`."""
    if getattr(request.module, "ONE_STORE_PER_MODULE", False):
        uri = request.getfixturevalue("store")
    else:
        uri = new_mlflow_store(shared, tmp_path / "mlruns" / "mlflow.db")
    _forget_mlflow_uris()
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _forget_mlflow_uris() -> None:
    """MLflow's set_tracking_uri/set_registry_uri (show1.store.connect calls both) are globals of the process that
    win over the environment, and they export MLFLOW_REGISTRY_URI for good: left by an earlier in-process test, they
    sent a later test's `models:/` download to that test's store (its files removed by then: an empty download)."""
    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry
        from mlflow.tracking._tracking_service import utils as tracking

        tracking._tracking_uri = None
        registry._registry_uri = None


@pytest.fixture
def prefect_home(tmp_path: Path, shared: Path) -> Path:
    """A PREFECT_HOME of this test's own, its database already migrated."""
    return new_prefect_home(shared, tmp_path / "prefect-home")


TRAINING_SMALL = {  # the demo clips at a quarter of the tiny profile's sizes, so every stage trains in seconds
    "curate": {"clip": {"sizes": [[32, 20], [128, 80]], "stride": 8}},
    "train": {"learning_rate": 0.001, "caption_dropout": 0.0, "batch_size": 2, "checkpoint_every": 100},
}


def curated_one_clip(folder: Path, overrides: dict[str, Any] | None = None) -> tuple[Path, Params]:
    """The demo clips curated with TRAINING_SMALL (+ overrides) into folder/curated, plus `one-clip/`: a fixed
    batch of one training clip."""
    (folder / "params.yaml").write_text(yaml.safe_dump(deep_merge(TRAINING_SMALL, overrides or {})))
    params = load_params(folder / "params.yaml")
    curated = folder / "curated"
    curate(REPO / "data/manifests/demo.csv", curated, params)
    # A fixed batch: one training clip (the val clip stays, the trainer ignores it).
    rows = [json.loads(line) for line in (curated / "index.jsonl").read_text().splitlines()]
    keep = [r for r in rows if r["split"] == "train"][:1] + [r for r in rows if r["split"] == "val"]
    (folder / "one-clip").mkdir()
    for item in curated.iterdir():
        if item.name != "index.jsonl":
            (folder / "one-clip" / item.name).symlink_to(item)
    (folder / "one-clip" / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    return folder, params


@pytest.fixture(scope="module")
def training_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    """The demo clips curated at a quarter of the tiny sizes, plus `one-clip/`: a fixed batch of one training clip."""
    return curated_one_clip(tmp_path_factory.mktemp("training"))
