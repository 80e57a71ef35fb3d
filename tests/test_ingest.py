"""New data in (`show1 ingest`, flows/ingest.py) on real clips, a real curation and a real Prefect server: only the
rows a dataset does not hold are curated, earlier shards are not touched, the contracts guard the publication, and
the `show1.data.ingested` event reaches the server exactly when new clips were kept."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import media
import pytest
from conftest import CLIPS_PER_GOOD_VIDEO, REPO
from safetensors import safe_open
from services import api, prefect_server
from shared_cache import new_prefect_home

from show1.config import Params
from show1.data.curate import curate
from show1.data.ingest import INGESTED, ContractBroken, dataset_resource_id, ingest
from show1.provenance import data_version

CAPTIONS = ["A red square over drifting stripes.", "Green waves roll to the right.", "Blue bars slide upwards.",
            "Orange rings pulse outwards.", "Purple dots scatter and swirl.", "Yellow lines sweep across."]
BINARY_CAPTION = b"\x00\x01\xfe\xff\x02\x03binary\x80\x81\x90\x04"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def files_of(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Every file of a dataset (not its lock) with its sha256, inode and mtime: a rewrite changes one of them."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino,
                                               p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def good(root: Path, stage: Callable[..., str], seed: int) -> dict[str, Any]:
    """A manifest row of the good video `seed`, staged in root/videos unless it is there (a copy would be a replaced
    file: its chunk's inputs would change)."""
    video = f"videos/good{seed}.mp4"
    if not (root / video).exists():
        stage(f"good{seed}")
    return {"video": video, "caption": CAPTIONS[seed]}


@pytest.fixture
def params(make_params: Callable[..., Params], tmp_path: Path) -> Params:
    """The small params (tmp_path/params.yaml), the contracts' results in tmp_path."""
    return make_params({"paths": {"validation": str(tmp_path / "validation")}})


@pytest.fixture
def dataset(root: Path, stage: Callable[..., str], params: Params, tmp_path: Path) -> Path:
    """tmp_path/data: three good videos curated by `show1 curate` from root/first.csv (one chunk, not full)."""
    first = media.write_manifest_csv(root / "first.csv", [good(root, stage, seed) for seed in range(3)])
    curate(first, tmp_path / "data", params)
    return tmp_path / "data"


def hostile_manifest(root: Path, stage: Callable[..., str], copy_of_good0: bool = True) -> tuple[Path, list[str]]:
    """Rows that must all end in quarantine, with the reason of each: files that are not there or not videos,
    paths out of bounds, captions no one can train on, a copy of a held clip (`copy_of_good0`), a row that does not
    parse."""
    rows = [
        ({"video": "videos/missing.mp4", "caption": "No such file."}, "missing_file"),
        ({"video": "../../../../etc/passwd", "caption": "Out of the manifest folder."}, "path_outside_root"),
        ({"video": "/etc/hostname", "caption": "An absolute path elsewhere."}, "path_outside_root"),
        ({"video": "ftp://example.org/a.mp4", "caption": "An ftp URL."}, "unsupported_scheme"),
        ({"video": "file:///etc/passwd", "caption": "A file URL."}, "unsupported_scheme"),
        ({"video": "videos/\x1b[31mred\x07.mp4", "caption": "Terminal escapes in the name."}, "missing_file"),
        ({"video": stage("good3"), "caption": BINARY_CAPTION}, "binary_caption"),
        ({"video": stage("good3"), "caption": "   "}, "empty_caption"),
        ({"video": stage("good3"), "caption": "a hostile caption " * 600}, "caption_too_long"),
        ({"video": stage("good3"), "caption": "A test split.", "split": "test"}, "bad_split"),
        ({"video": stage("good3"), "caption": "Starts soon.", "start": "soon"}, "bad_time_span"),
        ({"video": stage("truncated"), "caption": "Cut off half way."}, "undecodable"),
        ({"video": stage("zero_byte"), "caption": "Nothing at all."}, "empty_file"),
        ({"video": stage("text"), "caption": "Text named like a video."}, "undecodable"),
        ({"video": stage("static"), "caption": "Nothing moves here."}, "static"),
    ]
    if copy_of_good0:
        rows.append(({"video": stage("reencoded"), "caption": "The red square again, re-encoded."}, "duplicate"))
    manifest = media.write_manifest_csv(root / "hostile.csv", [row for row, _ in rows],
                                        columns=["video", "caption", "split", "start"])
    with manifest.open("ab") as handle:  # and a line with more fields than the header has columns
        handle.write(b'"a","b","c","d","e","f"\n')
    return manifest, [reason for _, reason in rows] + ["malformed_row"]


# ----------------------------------------------------------------------------------------------- the library


def test_ingest_curates_only_the_new_rows_and_leaves_earlier_shards_untouched(
        dataset: Path, root: Path, stage: Callable[..., str], params: Params) -> None:
    old_index, before, previous = read_jsonl(dataset / "index.jsonl"), files_of(dataset), data_version(dataset)
    rows = [good(root, stage, seed) for seed in range(5)] + [
        {"video": stage("reencoded"), "caption": "The red square again, re-encoded."}]  # a near-copy of row 0
    second = media.write_manifest_csv(root / "second.csv", rows)

    report = ingest(second, dataset, params)

    assert (report.rows, report.already_held, report.new_rows, report.kept, report.quarantined) == (6, 3, 3, 2, 1)
    assert report.quarantined_by_reason == {"duplicate": 1}
    assert report.new_clips == 2 * CLIPS_PER_GOOD_VIDEO and report.clips == 5 * CLIPS_PER_GOOD_VIDEO
    after = files_of(dataset)
    # The earlier chunk was skipped: its shard and part file are the same files, never rewritten or renamed.
    earlier = {name: stamp for name, stamp in before.items() if name.startswith(("shards/", "parts/"))}
    assert earlier and {name: after.get(name) for name in earlier} == earlier
    assert json.loads((dataset / "summary.json").read_text())["chunks_skipped"] == 1
    [new_shard] = [n for n in after if n.startswith("shards/") and n not in before]
    with safe_open(str(dataset / new_shard), framework="np") as shard:  # the copy's frames left the new shard
        assert {key.split("/")[0] for key in shard.keys()} == {"r0000003", "r0000004"}  # noqa: SIM118
    # The earlier clips are the index's first rows, unchanged; the new rows follow, numbered after the held ones.
    index = read_jsonl(dataset / "index.jsonl")
    assert index[:len(old_index)] == old_index and {r["row"] for r in index[len(old_index):]} == {3, 4}
    [copy] = [q for q in read_jsonl(dataset / "quarantine.jsonl") if q["row"] >= 3]
    assert copy["row"] == 5 and copy["reason"] == "duplicate" and "row 0" in copy["error"]
    # The new data version is the one version.json records (what lineage shows).
    assert report.previous_data_version == previous != report.data_version
    assert report.data_version == data_version(dataset) == json.loads((dataset / "version.json").read_text())[
        "data_version"]
    assert report.contracts and json.loads(Path(report.contracts).read_text())["success"] is True

    again = ingest(second, dataset, params)
    assert (again.new_rows, again.already_held, again.data_version) == (0, 6, report.data_version)
    assert again.nothing_kept and again.nothing_kept.startswith("nothing new")
    assert files_of(dataset) == after  # nothing curated, nothing written


def test_a_broken_contract_publishes_nothing(dataset: Path, root: Path, stage: Callable[..., str],
                                             make_params: Callable[..., Params], tmp_path: Path) -> None:
    before = files_of(dataset)
    second = media.write_manifest_csv(root / "second.csv", [good(root, stage, 3)])
    strict = make_params({"paths": {"validation": str(tmp_path / "validation")},
                          "contracts": {"min_train_clips": 1000}})
    with pytest.raises(ContractBroken, match="expect_column_sum_to_be_between") as broken:
        ingest(second, dataset, strict)
    assert "nothing was published" in str(broken.value)
    after = files_of(dataset)
    assert {name: after.get(name) for name in before} == before  # the published curation, byte for byte
    assert not (dataset / "ingested.json").exists()


def test_a_hostile_manifest_into_a_new_dataset_publishes_nothing(
        root: Path, stage: Callable[..., str], params: Params, tmp_path: Path) -> None:
    manifest, reasons = hostile_manifest(root, stage, copy_of_good0=False)
    report = ingest(manifest, tmp_path / "new", params)
    assert (report.new_rows, report.kept, report.quarantined) == (len(reasons), 0, len(reasons))
    assert report.nothing_kept and report.nothing_kept.startswith("nothing kept")
    assert report.data_version is None and not (tmp_path / "new" / "index.jsonl").exists()
    assert [q["reason"] for q in read_jsonl(tmp_path / "new" / "refused" / "quarantine.jsonl")] == reasons


def test_manifests_dropped_at_a_url_are_ingested_once_into_a_dataset_at_a_url(
        root: Path, stage: Callable[..., str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    """What the watch flow does, on fsspec's in-memory filesystem standing in for an object store (the generic
    fsspec path: glob, cat, pipe): a manifest at a URL names its videos by absolute paths under an allowed root."""
    from show1.data.folder import DataFolder
    from show1.data.ingest import pending_manifests

    params = make_params({"paths": {"validation": str(tmp_path / "validation")},
                          "curate": {"allowed_roots": [str(root)]}})
    base = f"memory://show1-{tmp_path.name}"
    incoming, data = DataFolder(f"{base}/incoming"), f"{base}/data"

    def drop(name: str, seeds: list[int]) -> None:
        rows = [good(root, stage, seed) | {"video": str(root / f"videos/good{seed}.mp4")} for seed in seeds]
        incoming.write_bytes(name, media.write_manifest_csv(tmp_path / name, rows).read_bytes())

    try:
        drop("first.csv", [0, 1])
        assert pending_manifests(incoming.location, data) == [f"{base}/incoming/first.csv"]
        first = ingest(f"{base}/incoming/first.csv", data, params)
        assert (first.kept, first.previous_data_version) == (2, None) and first.data_version
        shards = {n: DataFolder(data).read_bytes(n) for n in DataFolder(data).glob("shards/*")}
        assert pending_manifests(incoming.location, data) == []

        drop("second.csv", [1, 2])  # one row held already
        assert pending_manifests(incoming.location, data) == [f"{base}/incoming/second.csv"]
        second = ingest(f"{base}/incoming/second.csv", data, params)
        assert (second.already_held, second.kept, second.previous_data_version) == (1, 1, first.data_version)
        assert all(DataFolder(data).read_bytes(n) == b for n, b in shards.items())
        assert pending_manifests(incoming.location, data) == []
    finally:
        incoming.fs.rm(f"/show1-{tmp_path.name}", recursive=True)


# ------------------------------------------------------------------------------------ the Prefect server


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Iterator[str]:
    """A real Prefect server (its own PREFECT_HOME, a free port) for the module; yields its API URL."""
    folder = tmp_path_factory.mktemp("prefect-server")
    home = new_prefect_home(shared, folder / "home")
    env = os.environ | {
        "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false", "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.2"}  # events readable at once
    with prefect_server(folder, env) as base:
        yield base


def client_env(base: str, tmp_path: Path) -> dict[str, str]:
    return os.environ | {"PREFECT_API_URL": base, "PREFECT_HOME": str(tmp_path / "client-home"),
                         "PYTHONPATH": str(REPO), "DO_NOT_TRACK": "true"}


def show1(args: list[str], tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """`show1 --params tmp_path/params.yaml ARGS --json` in its own process: its JSON report (it must exit 0)."""
    done = subprocess.run([sys.executable, "-m", "show1.cli", "--params", str(tmp_path / "params.yaml"), *args,
                           "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"show1 {args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def events_of(base: str, data: Path, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """The server's show1.data.ingested events about the dataset `data`, oldest first, once it has `count`."""
    query = {"filter": {"event": {"name": [INGESTED]}, "resource": {"id": [dataset_resource_id(data)]},
                        "order": "ASC"}, "limit": 50}
    deadline = time.monotonic() + timeout
    while True:
        found = api(base, "/events/filter", query)["events"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_the_event_reaches_the_prefect_server_with_the_data_version_and_counts(
        prefect_api: str, dataset: Path, root: Path, stage: Callable[..., str], tmp_path: Path) -> None:
    env = client_env(prefect_api, tmp_path)
    previous = data_version(dataset)
    second = media.write_manifest_csv(root / "second.csv", [good(root, stage, seed) for seed in (0, 3, 4)])

    report = show1(["ingest", str(second), "--data", str(dataset)], tmp_path, env)

    assert report["event"]["sent"] and report["event"]["server"] == prefect_api
    [event] = events_of(prefect_api, dataset, 1)
    assert event["id"] == report["event"]["id"] and event["event"] == "show1.data.ingested"
    assert event["resource"]["prefect.resource.name"] == str(dataset.resolve())
    payload = event["payload"]
    assert payload["data_version"] == data_version(dataset) != previous == payload["previous_data_version"]
    assert (payload["rows"], payload["already_held"], payload["new_rows"], payload["kept"],
            payload["quarantined"], payload["new_clips"]) == (3, 1, 2, 2, 0, 2 * CLIPS_PER_GOOD_VIDEO)
    assert payload["data"] == str(dataset.resolve()) and payload["manifest"] == str(second.resolve())

    again = show1(["ingest", str(second), "--data", str(dataset)], tmp_path, env)
    assert not again["event"]["sent"] and again["event"]["reason"].startswith("nothing new")
    assert again["data_version"] == payload["data_version"]


def test_a_hostile_manifest_ingests_to_quarantine_and_triggers_nothing(
        prefect_api: str, dataset: Path, root: Path, stage: Callable[..., str], tmp_path: Path) -> None:
    env = client_env(prefect_api, tmp_path)
    manifest, reasons = hostile_manifest(root, stage)
    shards_before = {n: s for n, s in files_of(dataset).items() if n.startswith("shards/")}
    previous = data_version(dataset)

    report = show1(["ingest", str(manifest), "--data", str(dataset)], tmp_path, env)

    assert (report["new_rows"], report["kept"], report["quarantined"]) == (len(reasons), 0, len(reasons))
    assert not report["event"]["sent"] and report["event"]["reason"].startswith("no new clip")
    assert report["data_version"] == previous == data_version(dataset)
    quarantined = [q for q in read_jsonl(dataset / "quarantine.jsonl") if q["row"] >= 3]
    assert [q["reason"] for q in quarantined] == reasons  # each row, with its own reason, in manifest order
    assert {n: s for n, s in files_of(dataset).items() if n.startswith("shards/")} == shards_before

    # A good manifest afterwards: its event is the only one the server has of this dataset, and it follows the
    # version before the hostile manifest (the hostile rows stay held: they are not curated again).
    third = media.write_manifest_csv(root / "third.csv", [good(root, stage, 4)])
    sentinel = show1(["ingest", str(third), "--data", str(dataset)], tmp_path, env)
    assert sentinel["already_held"] == 0 and sentinel["kept"] == 1 and sentinel["event"]["sent"]
    time.sleep(1)  # anything sent before the sentinel is stored by now (the persister flushes every 0.2 s)
    [event] = events_of(prefect_api, dataset, 1)
    assert event["id"] == sentinel["event"]["id"] and event["payload"]["previous_data_version"] == previous


def test_the_watch_flow_ingests_a_dropped_manifest_once(
        prefect_api: str, dataset: Path, root: Path, stage: Callable[..., str], tmp_path: Path) -> None:
    """The flow watches root/: first.csv (what `show1 curate` made the dataset from) is held already; second.csv,
    dropped between two runs, is ingested once; a third run finds nothing to do."""
    staged = media.write_manifest_csv(tmp_path / "second.csv", [good(root, stage, 3), good(root, stage, 4)])
    script = f"""
import json, shutil
from flows.ingest import watch_flow
runs = [watch_flow({str(root)!r}, {str(dataset)!r}, "params.yaml")]
shutil.copy({str(staged)!r}, {str(root / "second.csv")!r})
runs += [watch_flow({str(root)!r}, {str(dataset)!r}, "params.yaml") for _ in range(2)]
print("RUNS " + json.dumps(runs))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=client_env(prefect_api, tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, second, third = json.loads(done.stdout.split("RUNS ", 1)[1])
    assert [r["manifest"] for r in first] == [str((root / "first.csv").resolve())] and first[0]["nothing_kept"]
    assert [(r["manifest"], r["kept"]) for r in second] == [(str((root / "second.csv").resolve()), 2)]
    assert third == []
    [event] = events_of(prefect_api, dataset, 1)
    assert event["id"] == second[0]["event"] and event["payload"]["kept"] == 2
    assert any(r["prefect.resource.id"].startswith("prefect.flow-run.") for r in event["related"])
    shutil.rmtree(tmp_path / "client-home", ignore_errors=True)
