"""`show1 evaluate` end to end on a real store: registry models generate for a prompt set, the videos are
scored against curated clips with the real Inception, the report renders in headless Chromium, MLflow gets a
run and the versions get eval.* tags, and the promotion gate reads them."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from services import api, prefect_server
from typer.testing import CliRunner

from show1.cli import app
from show1.config import load_params
from show1.data.curate import curate
from show1.evaluation.prompts import load_prompt_set
from show1.evaluation.reference import reference_videos, sample_frames
from show1.evaluation.reuse import finished_evaluation
from show1.models.text import tiny_text_encoder_dir
from show1.pipelines.weights import init_weights
from show1.registry.register import register_stage
from show1.registry.resolve import parse_refs, resolve
from show1.stack.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# The registered challengers the tests evaluate live in the module's store: conftest's `store`.
ONE_STORE_PER_MODULE = True


@pytest.fixture(scope="module")
def project(tmp_path_factory, store) -> Path:
    """Curated demo clips (small sizes), and random tiny base + interp weights registered as challengers."""
    folder = tmp_path_factory.mktemp("evaluation")
    doc = {
        "paths": {"curated": str(folder / "curated"), "cache": str(folder / "cache"), "runs": str(folder / "runs")},
        "curate": {"clip": {"sizes": [[32, 20], [128, 80]], "stride": 8}},
        "evaluate": {"stages": ["base", "interp"], "steps": 1, "frames_per_video": 4, "max_reference_clips": 4,
                     "reference_split": "train", "out": str(folder / "eval")},
    }
    (folder / "params.yaml").write_text(yaml.safe_dump(doc))
    params = load_params(folder / "params.yaml")
    curate(ROOT / "data/manifests/demo.csv", folder / "curated", params)
    weights = init_weights(folder / "weights", "tiny", stages=("base", "interp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        register_stage(params, "base", weights["base"])
        register_stage(params, "interp", weights["interp"], text_encoder=tiny_text_encoder_dir())
    return folder


def cli(project: Path, *args: str):
    return runner.invoke(app, ["--params", str(project / "params.yaml"), *args])


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread here, as in Dask's worker processes (distributed starts them with OMP_NUM_THREADS=1):
    CPU kernels sum in another order on another number of threads (measured: fid_vid 5e-7 relative apart)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report(project, tmp_path_factory, store) -> Path:
    """An untracked evaluation of two prompts, on one thread: its folder (metrics.json, report.html, videos/)."""
    out = tmp_path_factory.mktemp("report") / "eval"
    with pytest.MonkeyPatch.context() as patch, single_threaded():
        patch.setenv("MLFLOW_TRACKING_URI", store)  # the module's registry (a module fixture runs outside any test)
        result = cli(project, "evaluate", "--limit", "2", "--out", str(out), "--no-track")
    assert result.exit_code == 0, result.output
    return out


def test_prompt_sets_ship_with_the_repository(tmp_path):
    demo = load_prompt_set("demo")
    assert demo.name == "demo" and len(demo.prompts) == 3 and all(p and not p.startswith("#") for p in demo.prompts)
    ucf = load_prompt_set("ucf101")
    assert len(ucf.prompts) == 101 and "apply eye makeup" in ucf.prompts and "yo yo" in ucf.prompts
    assert load_prompt_set("ucf101", limit=5).prompts == ucf.prompts[:5]
    # A paper-comparable FVD: the paper profile generates 2048 videos, cycling UCF-101's 101 class prompts.
    paper = load_params(ROOT / "params.yaml", "paper").evaluate
    cycled = load_prompt_set(paper.prompts, paper.limit, paper.videos).prompts
    assert paper.videos == len(cycled) == 2048 and cycled[:101] == cycled[101:202] == ucf.prompts
    assert load_prompt_set("demo", limit=2, videos=5).prompts == demo.prompts[:2] * 2 + demo.prompts[:1]
    own = tmp_path / "mine.txt"
    own.write_text("# a comment\n\na dog surfing a wave  # inline comment\n")
    assert load_prompt_set(own).prompts == ("a dog surfing a wave",)
    with pytest.raises(FileNotFoundError, match="demo, ucf101"):
        load_prompt_set("no-such-set")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_set(tmp_path / "empty.txt")


def test_reference_clips_come_from_the_curated_split_at_its_largest_size(project):
    videos, size = reference_videos(project / "curated", "train", 3)
    assert size == "128x80" and len(videos) == 3
    assert all(v.dtype == np.uint8 and v.shape[1:] == (80, 128, 3) for v in videos)
    assert sample_frames(videos[0], 4).shape[0] == 4 and sample_frames(videos[0], 1000).shape == videos[0].shape


def test_evaluate_scores_reports_logs_and_tags_the_versions(project, store):
    result = cli(project, "evaluate", "--limit", "2")
    assert result.exit_code == 0, result.output
    out = project / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    details = json.loads((out / "details.json").read_text())  # the words beside the numbers (DVC metrics)
    assert metrics["prompts"] == 2 and details["prompt_set"] == "demo"
    assert metrics["fid_vid"] > 0 and 0 < metrics["temporal_consistency"] <= 1
    assert {"fvd", "clipsim", "inception_score"} <= set(details["skipped"])  # no I3D/CLIP/classifier configured
    assert details["models"]["base"] == "show1-base/1"
    per_prompt = json.loads((out / "per_prompt.json").read_text())
    assert [row["index"] for row in per_prompt] == [0, 1]
    for row in per_prompt:
        assert (out / row["video"]).is_file() and (out / row["video"]).with_suffix(".webm").is_file()
    report = (out / "report.html").read_text()
    assert "videos/000.webm" in report and "plots/metrics_by_version.png" in report
    assert (out / "plots" / "metrics_by_version.png").stat().st_size > 1000
    assert "fid_vid" in result.output and "report:" in result.output

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    base = client.get_model_version_by_alias("show1-base", "challenger")
    run = client.get_run(base.tags["eval.run_id"])
    assert run.data.tags["show1.kind"] == "evaluation" and run.data.tags["model.base"] == "show1-base/1"
    assert float(base.tags["eval.fid_vid"]) == pytest.approx(metrics["fid_vid"])
    assert run.data.metrics["fid_vid"] == pytest.approx(metrics["fid_vid"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/report.html" in artifacts and "evaluation/videos" in artifacts

    promoted = cli(project, "promote", "--stage", "base")  # the gate (fid_vid) now has a number to read
    assert promoted.exit_code == 0 and "promoted" in promoted.output and "no champion" in promoted.output

    # A second evaluation: same seeds, same videos, same numbers; the history plot has two points now.
    again = cli(project, "evaluate", "--limit", "2")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["fid_vid"] == pytest.approx(metrics["fid_vid"], rel=1e-6)
    runs = client.search_runs([run.info.experiment_id], filter_string="tags.`show1.kind` = 'evaluation'")
    assert len(runs) == 2

    # What `show1 run` asks before evaluating again: the same versions, prompts and settings find this evaluation;
    # other prompts or another seed do not.
    params = load_params(project / "params.yaml")
    versions = resolve(params, parse_refs("challenger", ("base", "interp")))
    prompts = load_prompt_set("demo", limit=2).prompts
    found = finished_evaluation(params, prompts, versions, "train", out)
    latest = client.get_model_version_by_alias("show1-base", "challenger").tags["eval.run_id"]
    assert found is not None and found["run_id"] == latest and found["metrics"]["fid_vid"] == pytest.approx(
        metrics["fid_vid"], rel=1e-6)
    assert finished_evaluation(params, prompts[:1], versions, "train", out) is None
    reseeded = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"seed": 1})})
    assert finished_evaluation(reseeded, prompts, versions, "train", out) is None


def test_a_failed_evaluation_keeps_the_last_report(project, report):
    out = project / "eval-keep"
    shutil.copytree(report, out)  # the last good report
    before = (out / "metrics.json").read_text()
    broken = cli(project, "evaluate", "--limit", "1", "--out", str(out), "--no-track", "--from-registry",
                 "base=1,interp=7")
    assert broken.exit_code == 1 and "show1-interp has no version '7'" in broken.output
    assert (out / "metrics.json").read_text() == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".eval-keep")]


def test_on_a_dask_cluster_each_worker_loads_the_cascade_once_and_the_videos_are_the_serial_ones(
        project, report, tmp_path, monkeypatch):
    """`--dask-address`: the batches go to that cluster's worker (here one, in this process, so its loads can be
    counted): it loads the cascade once for both prompts, and the videos are the serial run's, byte for byte."""
    from distributed import LocalCluster

    from show1.registry import resolve as resolving

    loads = []
    real_load = resolving.load_cascade
    monkeypatch.setattr(resolving, "load_cascade", lambda *args, **kw: loads.append(args) or real_load(*args, **kw))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            single_threaded():
        result = cli(project, "evaluate", "--limit", "2", "--out", str(tmp_path / "eval"), "--no-track",
                     "--dask-address", cluster.scheduler_address)
    assert result.exit_code == 0, result.output
    assert len(loads) == 1 and loads[0][2] == "base=1,interp=1"  # the versions pinned by number, not the alias
    rows = json.loads((tmp_path / "eval" / "per_prompt.json").read_text())
    assert [row["index"] for row in rows] == [0, 1] and len({row["worker"] for row in rows}) == 1
    for row in rows:
        assert (tmp_path / "eval" / row["video"]).read_bytes() == (report / row["video"]).read_bytes()
    check_metrics_equal(tmp_path / "eval", report)

    bad = cli(project, "evaluate", "--limit", "1", "--no-track", "--workers", "2")
    assert bad.exit_code == 2 and "needs kind: dask" in bad.output


def check_metrics_equal(folder: Path, serial: Path) -> None:
    """The same videos, the same numbers: frames received from a worker are scored as the same bytes in the same
    layout as frames made here. Only the last digits of the Frechet distance's matrix square root (LAPACK, its own
    threads) may differ between processes: measured 6e-13 relative."""
    metrics, expected = (json.loads((f / "metrics.json").read_text()) for f in (folder, serial))
    assert metrics.keys() == expected.keys()
    for name, value in metrics.items():
        assert value == (pytest.approx(expected[name], rel=1e-9) if isinstance(value, float) else expected[name]), name


class TinyVideoNet(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W) -> (B, 6)
        pooled = x.mean(dim=(3, 4))
        return torch.cat([pooled.mean(dim=2), pooled.std(dim=2)], dim=1)


class TinyClassifier(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 3) logits: the dominant colour
        return x.mean(dim=(2, 3)) * 10


def test_fvd_and_inception_score_use_the_configured_models(project, report, tmp_path):
    torch.jit.save(torch.jit.script(TinyVideoNet()), str(tmp_path / "i3d.pt"))
    torch.jit.save(torch.jit.script(TinyClassifier()), str(tmp_path / "classifier.pt"))
    doc = yaml.safe_load((project / "params.yaml").read_text())
    doc["evaluate"] |= {"i3d": str(tmp_path / "i3d.pt"), "classifier": str(tmp_path / "classifier.pt"),
                        "out": str(tmp_path / "eval"), "batch_size": 2}  # both prompts through the cascade at once
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["--params", str(tmp_path / "params.yaml"), "evaluate", "--limit", "2",
                                 "--no-track"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["fvd"] >= 0 and 1 <= metrics["inception_score"] <= 3
    assert set(json.loads((tmp_path / "eval" / "details.json").read_text())["skipped"]) == {"clipsim"}
    # The same prompts and seeds as the one-at-a-time evaluation (`report`): the same videos up to the float
    # rounding of batched arithmetic, so nearly the same numbers.
    serial = json.loads((report / "metrics.json").read_text())
    assert metrics["prompts"] == serial["prompts"] == 2
    for name in ("fid_vid", "temporal_consistency"):  # measured: 2e-5 and 1.5e-5 relative
        assert metrics[name] == pytest.approx(serial[name], rel=1e-3), name


def test_the_report_renders_in_headless_chromium_with_its_videos(report, tmp_path):
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("Debian's chromium + chromium-driver are not installed (make test installs them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out = report
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_bin))
    try:
        driver.get((out / "report.html").as_uri())
        ready = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const videos = [...document.querySelectorAll('video')];
            const loaded = v => new Promise(ok => {
                if (v.readyState >= 2 || v.error) return ok();
                v.addEventListener('loadeddata', ok); v.addEventListener('error', ok, true);
                setTimeout(ok, 20000);
            });
            Promise.all(videos.map(loaded)).then(() => done(videos.map(v => ({
                ready: v.readyState, error: v.error && v.error.code, width: v.videoWidth, src: v.currentSrc}))));
        """)
        images = driver.execute_script(
            "return [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth}))")
        title = driver.title
        console = driver.get_log("browser")
    finally:
        driver.quit()
    assert title.startswith("show1 evaluation")
    assert len(ready) == 2 and all(v["ready"] >= 2 and v["error"] is None and v["width"] == 64 for v in ready), ready
    assert images and all(i["complete"] and i["width"] > 0 for i in images)
    assert [entry for entry in console if entry["level"] in ("SEVERE", "WARNING")] == []




@pytest.mark.slow
def test_nightly_deployment_on_a_real_prefect_server(project, report, tmp_path, store, prefect_home):
    """prefect.yaml's nightly-evaluate deployment, deployed to a real server: its work pool and cron schedule
    are there, and a run triggered through the API is executed by a worker, generates on 2 Dask worker processes
    with the serial run's numbers, and logs to MLflow."""
    import os
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    # The nightly evaluation fans its prompts out over 2 Dask worker processes (prefect-dask's task runner).
    doc = yaml.safe_load((project / "params.yaml").read_text())
    doc["evaluate"]["executor"] = {"kind": "dask", "workers": 2}
    fanned_out = tmp_path / "params.yaml"
    fanned_out.write_text(yaml.safe_dump(doc))
    port = free_port()
    base = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "project"  # prefect.yaml and the flows, as a deployment's working directory sees them
    home.mkdir()
    shutil.copy2(ROOT / "prefect.yaml", home / "prefect.yaml")
    shutil.copytree(ROOT / "flows", home / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(prefect_home),
                        "PREFECT_API_URL": base, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
                        "SHOW1_HOME": str(home), "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(home),
                        "OMP_NUM_THREADS": "1"}  # the flow scores on one thread, as `report` did
    with prefect_server(tmp_path, env, port):
        def prefect(*args: str, timeout: int = 300) -> str:
            done = subprocess.run([str(bin_dir / "prefect"), *args], cwd=home, env=env, capture_output=True,
                                  text=True, timeout=timeout)
            assert done.returncode == 0, f"prefect {args}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            return done.stdout + done.stderr

        prefect("work-pool", "create", "gpu", "--type", "process")
        prefect("--no-prompt", "deploy", "--name", "nightly-evaluate")
        deployment = api(base, "/deployments/name/show1-generate-evaluate/nightly-evaluate")
        assert deployment["work_pool_name"] == "gpu"
        [schedule] = deployment["schedules"]
        assert schedule["schedule"]["cron"] == "0 3 * * *" and schedule["active"]
        assert deployment["parameters"]["prompts"] == "demo"

        run = api(base, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {
            "params_path": str(fanned_out), "limit": 2, "out": str(tmp_path / "nightly")}})
        prefect("worker", "start", "--pool", "gpu", "--run-once", timeout=600)
        state = api(base, f"/flow_runs/{run['id']}")["state"]
        assert state["type"] == "COMPLETED", state
    metrics = json.loads((tmp_path / "nightly" / "metrics.json").read_text())
    # Both workers generated (each loaded the cascade for its batch); the numbers are the serial run's.
    rows = json.loads((tmp_path / "nightly" / "per_prompt.json").read_text())
    assert [row["index"] for row in rows] == [0, 1] and len({row["worker"] for row in rows}) == 2, rows
    check_metrics_equal(tmp_path / "nightly", report)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`show1.kind` = 'evaluation'")
    assert any(r.data.metrics.get("fid_vid") == pytest.approx(metrics["fid_vid"]) for r in runs)
