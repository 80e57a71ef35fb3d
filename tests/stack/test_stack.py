"""The team stack (`show1 stack up`): PostgreSQL, the S3 store, MLflow and Prefect servers and their workers, started
by the real CLI, with the whole DAG (`show1 run`) pointed at it from one clone and the registry used from another.

Runs alone: `pytest tests/stack`. Skipped, with the reason printed, only where PostgreSQL is not installed
(`make test` installs it when root with apt).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from clone import fresh_clone, project_env, use_small_cascade
from mlflow.tracking import MlflowClient
from services import api

from show1.stack import object_store, postgres
from show1.stack.processes import Service, StackError, group_alive, is_running
from show1.stack.stack import read_state

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
SHOW1 = [sys.executable, "-m", "show1.cli"]
STAGES = ("base", "interp", "sr1", "sr2")


def _postgres_or_skip() -> None:
    try:
        postgres.binaries()
    except StackError as exc:
        pytest.skip(f"the stack needs PostgreSQL: {exc}")


def _as_a_background_job() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a non-interactive shell's `&` (a CI step) and nohup leave


def show1(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900, ok: bool = True,
          background: bool = False) -> subprocess.CompletedProcess:
    """`show1 ARGS`; `background`: started as a script's background job is, ignoring SIGINT."""
    done = subprocess.run([*SHOW1, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_as_a_background_job if background else None)
    if ok:
        assert done.returncode == 0, f"show1 {args}: {done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def stack_env(folder: Path, cwd: Path, env: dict[str, str]) -> dict[str, str]:
    """What `eval "$(show1 stack env)"` sets."""
    lines = show1(["stack", "env", "--dir", str(folder)], cwd, env).stdout.splitlines()
    pairs = [line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export ")]
    return {key: value.strip("'") for key, value in pairs}


@dataclass
class Stack:
    folder: Path  # the stack's folder
    project: Path  # the first clone: the stack was started there (its workers run flows there) and ran the DAG
    base_env: dict[str, str]  # a clone's environment, before the stack's settings
    up: subprocess.CompletedProcess
    run: subprocess.CompletedProcess  # `show1 run` in the project, pointed at the stack

    def env(self) -> dict[str, str]:
        """The project environment with the stack's settings (re-read: a restarted stack has new ports)."""
        return self.base_env | stack_env(self.folder, self.project, self.base_env)

    def pg(self, database: str = "mlflow") -> str:
        state = read_state(self.folder)
        return state.services["postgres"].url.rsplit("/", 1)[0] + f"/{database}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`show1 stack up` in a fresh clone with small params (started as a background job, ignoring SIGINT, as in a CI
    step), then `show1 run` there with the stack's settings; at the end `show1 stack down --purge`, and every process
    the stack started is gone."""
    _postgres_or_skip()
    tmp = tmp_path_factory.mktemp("stack")
    project = fresh_clone(tmp / "clone")
    use_small_cascade(project)
    base_env = project_env(tmp / "prefect-home")
    base_env.pop("MLFLOW_TRACKING_URI", None)
    # PostgreSQL runs as an unprivileged user when the tests run as root: its folder must be reachable by others,
    # which pytest's own temporary folders are not (0700).
    folder = Path(tempfile.mkdtemp(prefix="show1-stack-"))
    folder.chmod(0o755)
    pids: set[int] = set()
    try:
        up = show1(["stack", "up", "--dir", str(folder), "--timeout", "900", "--mlflow-workers", "1"], project,
                   base_env, background=True)
        state = read_state(folder)
        pids |= {service.pid for service in state.services.values()}
        env = base_env | stack_env(folder, project, base_env)
        run = show1(["run", "--limit", "1"], project, env, timeout=1500)
        yield Stack(folder, project, base_env, up, run)
    finally:
        state = read_state(folder) if (folder / "stack.json").is_file() else None
        if state is not None:
            pids |= {service.pid for service in state.services.values()}
        subprocess.run([*SHOW1, "stack", "down", "--dir", str(folder), "--purge"], cwd=project, env=base_env,
                       capture_output=True, timeout=600)
        left = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        for pid in left:
            psutil.Process(pid).kill()
        shutil.rmtree(folder, ignore_errors=True)
        assert not left, f"processes of the stack still running after `show1 stack down`: {left}"


def test_stack_up_starts_every_service_healthy_and_a_second_up_changes_nothing(stack):
    for line in ("MLflow:   http://127.0.0.1:", "Prefect:  http://127.0.0.1:", "S3:       http://127.0.0.1:",
                 "eval \"$(show1 stack env"):
        assert line in stack.up.stdout, stack.up.stdout
    state = read_state(stack.folder)
    assert set(state.services) == {"postgres", "s3", "mlflow", "prefect", "worker-cpu", "worker-gpu"}
    status = show1(["stack", "status", "--dir", str(stack.folder)], stack.project, stack.base_env)
    assert status.stdout.count(" ok ") == 6, status.stdout
    for name in state.services:
        assert (stack.folder / "logs" / f"{name}.log").is_file(), name
    # The MLflow server runs without MLflow's job runner: no huey consumer processes beside it.
    mlflow_tree = psutil.Process(state.services["mlflow"].pid).children(recursive=True)
    assert not [p.cmdline() for p in mlflow_tree if "huey_consumer" in " ".join(p.cmdline())]

    again = show1(["stack", "up", "--dir", str(stack.folder)], stack.project, stack.base_env)
    assert "already running" in again.stderr
    assert read_state(stack.folder).services == state.services  # the same processes

    env = stack.env()
    for pool in ("cpu", "gpu"):  # prefect.yaml's work pools, each with its worker online
        pool_info = api(env["PREFECT_API_URL"], f"/work_pools/{pool}")
        assert pool_info["type"] == "process"
        workers = api(env["PREFECT_API_URL"], f"/work_pools/{pool}/workers/filter", {})
        assert [w["status"] for w in workers if w["name"] == f"show1-{pool}"] == ["ONLINE"]


def test_the_whole_dag_lands_in_postgres_s3_and_the_prefect_server(stack):
    import psycopg

    assert "Prefect UI:     open http://127.0.0.1:" in stack.run.stdout, stack.run.stdout[-2000:]
    env = stack.env()
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    for stage in STAGES:
        version = client.get_model_version_by_alias(f"show1-{stage}", "challenger")
        assert version.version == "1"
        for tag in ("training_run_id", "data_version", "git_commit", "params_hash", "content_hash"):
            assert version.tags.get(tag), (stage, tag)
    for stage in ("base", "interp"):  # the evaluated stages passed the gate
        assert client.get_model_version_by_alias(f"show1-{stage}", "champion").version == "1"

    # In PostgreSQL: the runs (4 trainings, the generation's and the evaluation's), versions, aliases, tags.
    with psycopg.connect(stack.pg("mlflow")) as db:
        def count(sql: str) -> int:
            return db.execute(sql).fetchone()[0]

        assert count("SELECT count(*) FROM runs WHERE status = 'FINISHED'") >= 5
        assert count("SELECT count(*) FROM model_versions") == 4
        assert count("SELECT count(*) FROM registered_model_aliases WHERE alias = 'challenger'") == 4
        assert count("SELECT count(*) FROM model_version_tags WHERE key = 'eval.fid_vid'") == 2
        assert count("SELECT count(*) FROM metrics WHERE key = 'fid_vid'") >= 1

    # In S3: every version's weights, the evaluation's report and video, all under the tracking server's prefix.
    keys = object_store.keys(env["AWS_ENDPOINT_URL"], prefix="mlflow/")
    assert keys and all(key.startswith("mlflow/") for key in keys)
    assert sum(key.endswith(".safetensors") for key in keys) >= 4, keys
    assert any(key.endswith("report.html") for key in keys) and any(key.endswith(".mp4") for key in keys), keys
    # On the Prefect server: the cascade and its subflows, all completed.
    runs = api(env["PREFECT_API_URL"], "/flow_runs/filter", {})
    flows = {flow["id"]: flow["name"] for flow in api(env["PREFECT_API_URL"], "/flows/filter", {})}
    finished = {flows[run["flow_id"]] for run in runs if run["state_type"] == "COMPLETED"}
    assert {"show1-cascade", "show1-curate", "show1-train", "show1-register", "show1-generate-evaluate",
            "show1-promote"} <= finished, finished
    assert subprocess.run(["git", "status", "--porcelain"], cwd=stack.project, capture_output=True,
                          text=True).stdout == ""


def test_a_second_clone_that_knows_only_the_urls_reads_lineage_and_generates_from_the_registry(stack, tmp_path):
    other = fresh_clone(tmp_path / "other")
    env = stack.env()
    video = stack.project / "eval" / "videos" / "000.mp4"
    lineage = show1(["lineage", str(video)], other, env)
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    for stage in ("base", "interp"):
        version = client.get_model_version_by_alias(f"show1-{stage}", "champion")
        assert version.tags["training_run_id"] in lineage.stdout, stage
    out = tmp_path / "from-registry.mp4"
    generated = show1(["generate", "a red ball", "--from-registry", "champion", "--stages", "base,interp",
                       "--steps", "1", "--out", str(out)], other, env)
    assert out.is_file() and "29 frames" in generated.stdout, generated.stdout
    assert not (other / "mlruns" / "mlflow.db").exists()  # nothing went to a local store


def test_a_deployment_runs_on_the_stacks_cpu_worker(stack):
    """prefect.yaml's `register` deployment, deployed to the stack's Prefect server and run by its long-running cpu
    worker in the project: registration of unchanged stages returns their versions (no new one)."""
    env = stack.env()
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "register"],
                          cwd=stack.project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    base = env["PREFECT_API_URL"]
    deployment = api(base, "/deployments/name/show1-register/register")
    assert deployment["work_pool_name"] == "cpu"
    run = api(base, f"/deployments/{deployment['id']}/create_flow_run", {})
    deadline = time.monotonic() + 900
    while (state := api(base, f"/flow_runs/{run['id']}")["state"])["type"] not in ("COMPLETED", "FAILED", "CRASHED"):
        assert time.monotonic() < deadline, f"the cpu worker did not finish the run: {state}"
        time.sleep(2)
    log = (stack.folder / "logs" / "worker-cpu.log").read_text()
    assert state["type"] == "COMPLETED", log[-4000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    for stage in STAGES:
        assert [v.version for v in client.search_model_versions(f"name = 'show1-{stage}'")] == ["1"]


def test_the_stacks_uis_show_its_flow_runs_deployments_and_registry_in_a_browser(stack, tmp_path):
    """In headless Chromium, at the URLs `stack up` printed: the Prefect UI lists the cascade's flow run and the
    deployments (its UI asks the API where the browser found the UI, not at Prefect's default 127.0.0.1:4200), and
    the MLflow UI lists the registered models."""
    from browser import chromium, shown_text

    env = stack.env()
    base = env["PREFECT_API_URL"]
    prefect = base.removesuffix("/api")
    assert f"Prefect:  {prefect}" in stack.up.stdout
    try:
        api(base, "/deployments/name/show1-register/register")
    except urllib.error.HTTPError:  # not deployed by the deployment test (this test run alone): deploy it here
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "register"],
                              cwd=stack.project, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    flows = {flow["id"]: flow["name"] for flow in api(base, "/flows/filter", {})}
    [cascade] = [run for run in api(base, "/flow_runs/filter", {}) if flows[run["flow_id"]] == "show1-cascade"]
    with chromium(tmp_path / "chromium-profile") as browser:
        runs = shown_text(browser, f"{prefect}/runs", [cascade["name"], "show1-cascade"])
        deployments = shown_text(browser, f"{prefect}/deployments", ["register", "show1-register"])
        shown_text(browser, f"{env['MLFLOW_TRACKING_URI']}/#/models", [f"show1-{stage}" for stage in STAGES])
    assert "Can't connect to Server API" not in runs + deployments


def _events(base: str, name: str, at_least: int = 0) -> list[dict]:
    """The server's events named `name`, once it has stored `at_least` of them (it stores them in batches)."""
    deadline = time.monotonic() + 120
    while len(events := api(base, "/events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50})["events"]
              ) < at_least:
        assert time.monotonic() < deadline, f"{len(events)} {name} events stored, not {at_least}"
        time.sleep(1)
    return events


def _refresh_runs(base: str, deployment: str) -> list[dict]:
    return api(base, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment]}}})


def test_ingests_alone_trigger_refreshes_one_at_a_time_that_fine_tune_the_champions_and_record_the_gate(
        stack, tmp_path):
    """The loop closes itself: prefect.yaml's `refresh` deployment (an event trigger on show1.data.ingested) deployed
    to the stack, then `show1 ingest` of new clips, and no other command: the stack's gpu worker fine-tunes each
    evaluated stage from its champion, registers, evaluates both, and the gate's decision is on the new versions and
    on the flow run (a markdown artifact). A second ingest during that refresh gets its own run, which waits for the
    first (the deployment's concurrency limit). A hostile manifest ingests to quarantine and triggers nothing."""
    import media

    from show1.provenance import data_version

    env = stack.env()
    base = env["PREFECT_API_URL"]
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "refresh"],
                          cwd=stack.project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    deployment = api(base, "/deployments/name/show1-refresh/refresh")
    assert deployment["work_pool_name"] == "gpu"
    assert (deployment.get("global_concurrency_limit") or {}).get("limit") == 1 or \
        deployment.get("concurrency_limit") == 1, deployment
    automations = api(base, "/automations/filter", {})
    assert any(a["trigger"].get("expect") == ["show1.data.ingested"] for a in automations), automations

    curated = stack.project / "data" / "curated"
    versions, videos = [], []
    for batch, seed in enumerate((11, 12)):
        video = media.write_video(tmp_path / f"new-{seed}.mp4", frames=120, fps=24, size=(256, 160), seed=seed)
        videos.append(video)
        manifest = tmp_path / f"new-{batch}.csv"
        manifest.write_text(f"id,video,caption,split\nnew{batch},{video},a new moving pattern number {batch},train\n")
        ingested = show1(["ingest", str(manifest)], stack.project, env)
        assert "event show1.data.ingested sent" in ingested.stdout, ingested.stdout
        versions.append(data_version(curated))
        deadline = time.monotonic() + 600
        while batch == 0 and not any(r["state_type"] == "RUNNING" for r in _refresh_runs(base, deployment["id"])):
            assert time.monotonic() < deadline, "the first ingest started no refresh"
            time.sleep(1)  # the second ingest comes while the first refresh runs
    events = _events(base, "show1.data.ingested", at_least=2)
    assert sorted(e["payload"]["data_version"] for e in events) == sorted(versions)
    assert all(e["payload"]["kept"] == 1 for e in events)

    deadline = time.monotonic() + 1500
    while len(runs := _refresh_runs(base, deployment["id"])) < 2 or any(
            r["state_type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
        assert time.monotonic() < deadline, f"the refreshes did not finish: {runs}"
        time.sleep(3)
    log = (stack.folder / "logs" / "worker-gpu.log").read_text()
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], log[-6000:]
    first, second = sorted(runs, key=lambda r: r["start_time"])
    assert [first["name"], second["name"]] == [f"refresh-{v[:12]}" for v in versions]
    assert second["start_time"] >= first["end_time"]  # one at a time: the second waited for the first

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    for stage in ("base", "interp"):  # evaluate.stages of the small cascade: the stages a refresh fine-tunes
        name = f"show1-{stage}"
        two, three = client.get_model_version(name, "2"), client.get_model_version(name, "3")
        assert two.tags["fine_tuned_from"] == f"{name}/1" and two.tags["data_version"] in versions
        # the second refresh started from the champion the first one left
        after_first = "2" if two.tags["promotion.decision"] == "promoted" else "1"
        assert three.tags["fine_tuned_from"] == f"{name}/{after_first}"
        assert three.tags["data_version"] == versions[1]
        tree = json.loads(show1(["lineage", f"{name}/3", "--json"], stack.project, env).stdout)
        training = tree["children"][0]
        assert [c["kind"] for c in training["children"]] == ["data", "fine-tuned from"]
        assert training["children"][0]["label"] == versions[1]
        assert training["children"][1]["label"] == f"{name}/{after_first}"
        for version in (two, three):  # the champion moved, or stayed with the refusal recorded on the challenger
            assert version.tags["promotion.decision"] in ("promoted", "rejected") and version.tags["promotion.reason"]
        champion = client.get_model_version_by_alias(name, "champion").version
        assert champion == ("3" if three.tags["promotion.decision"] == "promoted" else after_first)
    artifacts = api(base, "/artifacts/filter", {"artifacts": {"key": {"any_": ["show1-refresh"]}}})
    assert len(artifacts) == 2 and any("| base | show1-base/3 |" in a["data"] for a in artifacts), artifacts

    hostile = tmp_path / "hostile.csv"
    hostile.write_text("id,video,caption,split\n"
                       f"gone,{tmp_path / 'missing.mp4'},a video that is not there,train\n"
                       f"empty,{videos[0]},,train\n")
    refused = show1(["ingest", str(hostile)], stack.project, env, ok=False)
    assert "quarantined" in refused.stdout and "no event" in refused.stdout, refused.stdout + refused.stderr
    time.sleep(5)  # an automation would have made its flow run by now
    assert len(_events(base, "show1.data.ingested")) == 2
    assert len(_refresh_runs(base, deployment["id"])) == 2


def test_two_processes_registering_one_checkpoint_on_postgresql_make_one_version(stack, tmp_path):
    params = yaml.safe_load((stack.project / "params.yaml").read_text())
    params["registry"] = {"model_prefix": "race"}
    (tmp_path / "race.yaml").write_text(yaml.safe_dump(params))
    command = [*SHOW1, "--params", str(tmp_path / "race.yaml"), "register", "--stage", "interp", "--checkpoint",
               "runs/interp/final"]
    env = stack.env()
    procs = [subprocess.Popen(command, cwd=stack.project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("models:/race-interp/1" in out for out, _ in outputs), outputs
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    assert [v.version for v in client.search_model_versions("name = 'race-interp'")] == ["1"]


def test_registration_with_the_object_store_down_fails_clearly_and_registers_nothing(stack, tmp_path):
    """The S3 store killed (its bucket saved first, as `stack down` does): registering a stage ends, after MLflow's
    retries (here 1), with an error that names the artifact store, and no version exists. `show1 stack up` starts
    the store again on its port with the saved bucket, and the same registration then succeeds."""
    params = yaml.safe_load((stack.project / "params.yaml").read_text())
    params["registry"] = {"model_prefix": "s3down"}
    (tmp_path / "s3down.yaml").write_text(yaml.safe_dump(params))
    command = ["--params", str(tmp_path / "s3down.yaml"), "register", "--stage", "sr1", "--checkpoint",
               "runs/sr1/final"]
    env = stack.env() | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    s3 = read_state(stack.folder).services["s3"]
    object_store.save(s3.url, stack.folder / "s3")
    os.killpg(s3.pid, signal.SIGKILL)
    started = time.monotonic()
    failed = show1(command, stack.project, env, timeout=900, ok=False)
    seconds = time.monotonic() - started
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-4000:]
    message = " ".join(failed.stderr.split())
    assert "uploading the sr1 model to the artifact store failed" in message, failed.stderr[-3000:]
    assert "no version of s3down-sr1 was registered" in message and "Traceback" not in failed.stderr
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    assert client.search_model_versions("name = 's3down-sr1'") == []
    print(f"registration with the object store down failed after {seconds:.1f} s")

    again = show1(["stack", "up", "--dir", str(stack.folder), "--timeout", "900"], stack.project, stack.base_env)
    assert "starting s3 again on the same ports" in again.stderr, again.stderr
    assert "loaded" in again.stderr  # the saved bucket
    registered = show1(command, stack.project, env, timeout=900)
    assert "models:/s3down-sr1/1" in registered.stdout, registered.stdout
    assert [v.version for v in client.search_model_versions("name = 's3down-sr1'")] == ["1"]


@contextlib.contextmanager
def _killed(stack: Stack, name: str) -> Iterator[Service]:
    """The stack's service `name` killed (SIGKILL of its process group: its own children too, PostgreSQL's backends,
    MLflow's workers); at the block's end `show1 stack up` starts it again, on its port: its URL is the same."""
    service = read_state(stack.folder).services[name]
    os.killpg(service.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while group_alive(service.pid):
        assert time.monotonic() < deadline, f"{name} outlived SIGKILL"
        time.sleep(0.1)
    assert not is_running(service)
    yield service
    again = show1(["stack", "up", "--dir", str(stack.folder), "--timeout", "900"], stack.project, stack.base_env)
    assert f"starting {name} again on the same ports" in again.stderr, again.stderr
    restarted = read_state(stack.folder).services[name]
    assert restarted.url == service.url and restarted.pid != service.pid


def _whole(stack: Stack) -> None:
    """Every service of the stack healthy, its workers ONLINE (those that rode out an outage did not die of it)."""
    status = show1(["stack", "status", "--dir", str(stack.folder)], stack.project, stack.base_env)
    assert status.stdout.count(" ok ") == 6, status.stdout


def _logged_once(db: Any, run_dir: Path, steps: int) -> None:
    """The training run of `run_dir` FINISHED in MLflow's PostgreSQL, with the loss of each of its `steps` steps (its
    metrics.jsonl) there once."""
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    rows = db.execute("SELECT step, count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss' GROUP BY step "
                      "ORDER BY step", (run_id,)).fetchall()
    status = db.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()[0]
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in rows] == logged and len(logged) == steps, (run_dir.name, rows, logged)
    assert all(count == 1 for _, count in rows), (run_dir.name, rows)
    assert status == "FINISHED", run_dir.name


@pytest.mark.parametrize("service", ["mlflow", "postgres"])
def test_training_carries_on_through_a_killed_and_restarted_tracking_server_or_database(stack, tmp_path, service):
    """SIGKILL of the tracking server, or of PostgreSQL under it, in the middle of a training run; `show1 stack up`
    starts it again on its port. The training's MLflow client retries meanwhile (the tracking server answers 503
    while its database is gone, and reconnects when it is back): the run finishes, with each step's loss in
    PostgreSQL once, and the whole stack is up again."""
    import psycopg

    # MLflow's retries back off 1, 2, 4 … s (its default doubles from 2 s): the same 7 retries ride out a restart of
    # up to 2 minutes, and the training resumes sooner after it.
    env = stack.env() | {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    steps, run_dir = 8, tmp_path / "run"
    training = subprocess.Popen([*SHOW1, "train", "--stage", "base", "--data", "data/curated", "--out", str(run_dir),
                                 "--max-steps", str(steps), "--checkpoint-every", str(steps), "--quiet"],
                                cwd=stack.project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with psycopg.connect(stack.pg("mlflow"), autocommit=True) as db:
            def logged_steps() -> int:
                if not (run_dir / "mlflow_run_id").is_file():
                    return 0
                run_id = (run_dir / "mlflow_run_id").read_text().strip()
                return db.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss'",
                                  (run_id,)).fetchone()[0]

            deadline = time.monotonic() + 600
            while (killed_at := logged_steps()) < 1:
                assert training.poll() is None, training.communicate()
                assert time.monotonic() < deadline, "the training logged no step"
                time.sleep(0.2)
        assert killed_at < steps and training.poll() is None, "the training ended before the kill: raise steps"
        with _killed(stack, service):
            time.sleep(2)  # the training meets the outage
        stdout, stderr = training.communicate(timeout=900)
    finally:
        training.kill()
    assert training.returncode == 0, stdout[-2000:] + stderr[-4000:]
    with psycopg.connect(stack.pg("mlflow")) as db:
        _logged_once(db, run_dir, steps)
    _whole(stack)


@pytest.mark.parametrize("service", ["postgres", "prefect"])
def test_a_flow_run_on_the_stacks_worker_carries_on_through_a_killed_and_restarted_database_or_prefect_server(
        stack, tmp_path, service):
    """The training flow of two stages, deployed to the stack's `cpu` pool and run by its worker; once the server
    has the first stage's task run COMPLETED and the second stage trains, SIGKILL of PostgreSQL (under both servers)
    or of the Prefect server, and `show1 stack up` starts it again. The flow run ends COMPLETED, and after the
    restart the server holds it once, COMPLETED, with one COMPLETED task run per stage and what it printed; in MLflow
    each training run FINISHED with each step's loss once, and each run's sample video is in S3. (What a killed
    Prefect server still loses is said at the end.)"""
    import psycopg

    steps, runs = 10, tmp_path / "runs"
    params = yaml.safe_load((stack.project / "params.yaml").read_text())
    params["train"] |= {"sample_every": steps, "sample_steps": 1}  # one sample video per run: an artifact in S3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = stack.env()
    base = env["PREFECT_API_URL"]
    deployment = api(base, "/deployments/", {
        "name": f"faults-{service}", "flow_id": api(base, "/flows/name/show1-train")["id"],
        "entrypoint": "flows/train.py:train_flow", "work_pool_name": "cpu", "enforce_parameter_schema": False,
        "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(stack.project)}}]})
    run = api(base, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {
        "stages": ["base", "interp"], "runs": str(runs), "params_path": str(tmp_path / "params.yaml"),
        "max_steps": steps}})
    worker_log = stack.folder / "logs" / "worker-cpu.log"
    log_start = worker_log.stat().st_size

    def state() -> str:
        return api(base, f"/flow_runs/{run['id']}")["state"]["type"]

    def second_stage_trains() -> bool:  # the first stage's task run COMPLETED on the server, the second's started
        tasks = api(base, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        return "COMPLETED" in [task["state_type"] for task in tasks] and (runs / "interp" / "mlflow_run_id").is_file()

    deadline = time.monotonic() + 600
    while not (state() == "RUNNING" and second_stage_trains()):
        assert state() in ("SCHEDULED", "PENDING", "RUNNING"), worker_log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the flow run did not reach its second stage"
        time.sleep(0.5)
    assert not (runs / "interp" / "final").exists(), "the second stage was trained before the kill: raise steps"
    with _killed(stack, service):
        time.sleep(2)  # the flow run meets the outage
    deadline = time.monotonic() + 900
    while (ended := state()) not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        assert time.monotonic() < deadline, f"the flow run did not end: {ended}"
        time.sleep(2)
    assert ended == "COMPLETED", worker_log.read_text()[-6000:]
    runs_of_deployment = api(base, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})
    assert [r["id"] for r in runs_of_deployment] == [run["id"]]
    with psycopg.connect(stack.pg("prefect")) as db:
        final, end_time = db.execute("SELECT state_type, end_time FROM flow_run WHERE id = %s",
                                     (run["id"],)).fetchone()
        tasks = db.execute("SELECT task_key, dynamic_key, state_type FROM task_run WHERE flow_run_id = %s",
                           (run["id"],)).fetchall()
    assert final == "COMPLETED" and end_time is not None
    # one task run per stage: none run twice (a retried or resubmitted task would be a third)
    assert len(tasks) == 2 and len({dynamic for _, dynamic, _ in tasks}) == 2, tasks
    # no log batch of the flow run was refused (the workers retry the Prefect server's 500s while PostgreSQL is gone)
    with open(worker_log, "rb") as log:
        log.seek(log_start)
        assert b"Error logging to API" not in log.read(), f"the flow run dropped log lines: see {worker_log}"
    keys = object_store.keys(env["AWS_ENDPOINT_URL"], prefix="mlflow/")
    with psycopg.connect(stack.pg("mlflow")) as db:
        for stage in ("base", "interp"):
            _logged_once(db, runs / stage, steps)
            run_id = (runs / stage / "mlflow_run_id").read_text().strip()
            samples = [key for key in keys if f"/{run_id}/artifacts/samples/" in key]
            assert [key.rsplit("/", 1)[1] for key in samples] == [f"step-{steps:06d}.mp4"], (stage, samples)
    _whole(stack)

    # Each task run's last state, and what the flow run printed (during the outage included), on the server. A
    # SIGKILLed Prefect server loses some of it (issue 36): the events and log lines it had taken but not stored yet,
    # and the events a flow run emits while the server stays away longer than its events client's ~10 reconnection
    # attempts (Prefect's in-memory messaging; not a setting). Seen: the second task run left RUNNING, a stage's last
    # lines missing. Known for that kill alone: all of it must hold with PostgreSQL killed.
    logs: list[str] = []
    while page := api(base, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "offset": len(logs)}):
        logs += [log["message"] for log in page]  # the server's pages of up to 200
    lost = [f"task run {dynamic} {state}" for _, dynamic, state in tasks if state != "COMPLETED"]
    lost += [f"log line {line!r}" for stage in ("base", "interp") for line in (
        f"{stage}: step 1 loss", f"{stage}: step {steps} loss", f"{stage}: {steps} steps, final loss")
        if not any(message.startswith(line) for message in logs)]
    if lost and service == "prefect":
        pytest.xfail(f"the Prefect server's SIGKILL lost: {lost}")
    assert not lost, lost


def test_a_backup_restored_onto_a_second_stack_brings_back_the_registry_lineage_artifacts_and_flow_runs(
        stack, tmp_path):
    """`show1 stack backup` of the running stack (left as it was), then `show1 stack restore` of it onto a second,
    fresh stack beside it (its own PostgreSQL and S3 on other ports): there the same versions and aliases, the same
    `show1 lineage`, `show1 generate --from-registry` on the restored weights, and the Prefect server's flow runs.
    A backup with one byte flipped is refused before anything is written."""

    def registry(env: dict[str, str]) -> dict:
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
        return {m.name: (m.aliases, sorted((v.version, v.run_id, v.tags.get("training_run_id"), v.tags.get(
            "content_hash")) for v in client.search_model_versions(f"name = '{m.name}'")))
            for m in client.search_registered_models()}

    def flow_runs(env: dict[str, str]) -> dict[str, str]:
        runs = api(env["PREFECT_API_URL"], "/flow_runs/filter", {"sort": "ID_DESC", "limit": 200})
        return {run["id"]: run["state_type"] for run in runs}

    env = stack.env()
    before, runs = registry(env), flow_runs(env)
    champion = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"]
                            ).get_model_version_by_alias("show1-base", "champion")
    lineage = show1(["lineage", "show1-base@champion", "--json"], stack.project, env).stdout
    backup = tmp_path / "backup"
    made = show1(["stack", "backup", str(backup), "--dir", str(stack.folder)], stack.project, stack.base_env)
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["objects"] == len(object_store.keys(env["AWS_ENDPOINT_URL"])) > 0, made.stderr
    assert manifest["stack"]["ports"] == read_state(stack.folder).ports
    assert {"postgres/mlflow.dump", "postgres/prefect.dump"} <= set(manifest["files"])
    assert show1(["stack", "backup", str(backup), "--dir", str(stack.folder)], stack.project, stack.base_env,
                 ok=False).returncode == 1  # an existing backup is not overwritten unasked
    damaged = tmp_path / "damaged"
    shutil.copytree(backup, damaged)
    dump = damaged / "postgres" / "mlflow.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))

    other = Path(tempfile.mkdtemp(prefix="show1-stack-"))  # reachable by PostgreSQL's user, as the fixture's
    other.chmod(0o755)
    try:
        show1(["stack", "up", "--dir", str(other), "--timeout", "900", "--mlflow-workers", "1", "--no-workers"],
              stack.project, stack.base_env)
        started = read_state(other)
        assert started.ports["postgres"] != read_state(stack.folder).ports["postgres"]
        refused = show1(["stack", "restore", str(damaged), "--dir", str(other)], stack.project, stack.base_env,
                        ok=False)
        assert refused.returncode == 1 and f"{dump} does not match its checksum" in " ".join(refused.stderr.split())
        assert read_state(other).services == started.services  # nothing was stopped,
        other_env = stack.base_env | stack_env(other, stack.project, stack.base_env)
        assert registry(other_env) == {} and object_store.keys(other_env["AWS_ENDPOINT_URL"]) == []  # nor written

        restored = show1(["stack", "restore", str(backup), "--dir", str(other)], stack.project, stack.base_env)
        assert "restored the mlflow database" in restored.stderr, restored.stderr
        other_env = stack.base_env | stack_env(other, stack.project, stack.base_env)
        assert other_env["MLFLOW_TRACKING_URI"] != env["MLFLOW_TRACKING_URI"]
        assert registry(other_env) == before
        assert show1(["lineage", "show1-base@champion", "--json"], stack.project, other_env).stdout == lineage
        assert champion.tags["training_run_id"] in lineage
        out = tmp_path / "restored.mp4"
        clone = fresh_clone(tmp_path / "clone")  # knows only the second stack's URLs: the weights come from there
        generated = show1(["generate", "a red ball", "--from-registry", "champion", "--stages", "base,interp",
                           "--steps", "1", "--out", str(out)], clone, other_env)
        assert out.is_file() and "29 frames" in generated.stdout, generated.stdout
        assert runs and flow_runs(other_env) == runs
    finally:
        subprocess.run([*SHOW1, "stack", "down", "--dir", str(other), "--purge"], cwd=stack.project,
                       env=stack.base_env, capture_output=True, timeout=600)
        shutil.rmtree(other, ignore_errors=True)
    assert registry(stack.env()) == before  # the first stack is as it was


def test_down_stops_everything_and_up_brings_back_the_registry_and_its_files(stack, tmp_path, monkeypatch):
    state = read_state(stack.folder)
    before = stack.env()
    champion = MlflowClient(tracking_uri=before["MLFLOW_TRACKING_URI"], registry_uri=before["MLFLOW_TRACKING_URI"]
                            ).get_model_version_by_alias("show1-base", "champion").version
    down = show1(["stack", "down", "--dir", str(stack.folder)], stack.project, stack.base_env)
    assert "stopped: worker-gpu, worker-cpu, prefect, mlflow, s3, postgres" in down.stdout, down.stdout
    # each on its stop signal, although `stack up` ran as a background job (its Prefect workers stop their inner
    # process with SIGINT, which such a job ignores): none had to be killed
    assert "killed" not in down.stdout, down.stdout
    assert not any(is_running(service) for service in state.services.values())
    # and no process of any service's group is left either (MLflow's and PostgreSQL's own children included):
    # `down` returns once they are gone, not when it has sent the signals
    left = [name for name, service in state.services.items() if group_alive(service.pid)]
    assert not left, f"processes of {left} still running when `stack down` returned"
    assert not (stack.folder / "stack.json").exists()
    saved = [p for p in (stack.folder / "s3").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in saved)
    assert show1(["stack", "status", "--dir", str(stack.folder)], stack.project, stack.base_env, ok=False
                 ).returncode == 1

    show1(["stack", "up", "--dir", str(stack.folder), "--timeout", "900", "--mlflow-workers", "1", "--no-workers"],
          stack.project, stack.base_env)
    env = stack.env()
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    assert client.get_model_version_by_alias("show1-base", "champion").version == champion  # PostgreSQL kept it
    # and the S3 store got its files back: downloaded through the tracking server
    from mlflow.artifacts import download_artifacts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # models:/ URIs resolve through it
    files = Path(download_artifacts("models:/show1-base@champion", dst_path=str(tmp_path)))
    assert any(p.suffix == ".safetensors" for p in files.rglob("*")), list(files.rglob("*"))


def test_a_stack_beyond_loopback_requires_credentials_of_every_client_and_serves_the_runner_account(
        tmp_path, monkeypatch):
    """`show1 stack up --host 127.0.0.2` (another address than 127.0.0.1, as 0.0.0.0 or an interface's would be):
    its credentials are generated into a file only its user reads; with `show1 stack env`'s exports MLflow serves
    that address (no "Invalid Host header") and the runner account does what runners do, even in another account's
    experiment and model; without them, or with a wrong password, MLflow and Prefect answer 401 and write nothing;
    PostgreSQL refuses a connection without its password, which no process shows on its command line. In a browser,
    the Prefect UI's login page refuses a wrong auth string and takes the right one; the MLflow UI lists the models
    with the runner account."""
    import base64
    import stat
    import urllib.request

    import psycopg

    _postgres_or_skip()
    env = project_env(tmp_path / "prefect-home")
    for key in [k for k in env if k.startswith(("MLFLOW_", "PREFECT_API", "AWS_"))]:
        env.pop(key)
    folder = Path(tempfile.mkdtemp(prefix="show1-stack-"))  # reachable by PostgreSQL's user, as the fixture's
    folder.chmod(0o755)
    refused_folder = Path(tempfile.mkdtemp(prefix="show1-stack-"))

    def http(url: str, body: dict | None = None, headers: dict | None = None) -> int:
        request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers={
            "Content-Type": "application/json", **(headers or {})}, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    try:
        no = show1(["stack", "up", "--dir", str(refused_folder), "--host", "127.0.0.2", "--no-credentials"],
                   tmp_path, env, ok=False)
        assert no.returncode == 1 and "cannot run without credentials" in " ".join(no.stderr.split()), no.stderr
        assert not (refused_folder / "stack.json").exists()

        up = show1(["stack", "up", "--dir", str(folder), "--host", "127.0.0.2", "--mlflow-workers", "1", "--timeout",
                    "600"], tmp_path, env)
        secrets_file = folder / "credentials"
        assert f"credentials: on ({secrets_file})" in " ".join(up.stdout.split())
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        secrets = json.loads(secrets_file.read_text())
        client_env = stack_env(folder, tmp_path, env)
        uri = client_env["MLFLOW_TRACKING_URI"]
        assert uri.startswith("http://127.0.0.2:") and client_env["PREFECT_API_URL"].startswith("http://127.0.0.2:")
        assert client_env["MLFLOW_TRACKING_USERNAME"] == "show1"
        assert client_env["MLFLOW_TRACKING_PASSWORD"] == secrets["mlflow_password"]
        assert client_env["PREFECT_API_AUTH_STRING"] == secrets["prefect_auth_string"]
        # Every service healthy, the workers ONLINE: they reach the Prefect server with its auth string.
        assert "credentials: on" in show1(["stack", "status", "--dir", str(folder)], tmp_path, env).stdout

        state = read_state(folder)
        pg_url = state.services["postgres"].url  # the stack's own connection: its pgpass file
        with psycopg.connect(pg_url.replace("/postgres?", "/mlflow?")) as connection:
            before = connection.execute("SELECT count(*) FROM experiments").fetchone()[0]

        # Nobody gets in without the runner's password, and a refused request writes nothing.
        create = {"name": "intruder"}
        api_url = f"{uri}/api/2.0/mlflow"
        assert http(f"{api_url}/experiments/search?max_results=5") == 401
        assert http(f"{api_url}/experiments/create", create) == 401
        assert http(f"{api_url}/experiments/create", create, basic("show1", "wrong")) == 401
        assert http(f"{api_url}/experiments/create", create, basic("admin", "wrong")) == 401
        prefect_api = client_env["PREFECT_API_URL"]
        auth = {"Authorization": "Basic " + base64.b64encode(secrets["prefect_auth_string"].encode()).decode()}
        assert http(f"{prefect_api}/flow_runs/filter", {}) == 401
        assert http(f"{prefect_api}/flows/", {"name": "intruder"}) == 401
        assert http(f"{prefect_api}/flows/", {"name": "intruder"}, {"Authorization": "Basic d3Jvbmc="}) == 401
        assert http(f"{prefect_api}/flow_runs/filter", {}, auth) == 200
        assert http(f"{prefect_api}/flows/filter", {}, auth) == 200
        with psycopg.connect(pg_url.replace("/postgres?", "/prefect?")) as connection:
            assert connection.execute("SELECT count(*) FROM flow WHERE name = 'intruder'").fetchone()[0] == 0
        with psycopg.connect(pg_url.replace("/postgres?", "/mlflow?")) as connection:
            assert connection.execute("SELECT count(*) FROM experiments").fetchone()[0] == before

        # The admin's experiment and model; the runner account logs, registers, aliases and deletes in them.

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets["mlflow_admin_password"])
        admin = MlflowClient(tracking_uri=uri, registry_uri=uri)
        shared = admin.create_experiment("admins-experiment")
        admin.create_registered_model("admins-model")
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(key, client_env[key])
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        runner = MlflowClient(tracking_uri=uri, registry_uri=uri)
        # What a new user runs with `eval "$(show1 stack env)"` (a fresh process: this one's MLflow may hold another
        # test's tracking URI): no 403 "Invalid Host header", the admin's experiment readable with the runner account.
        listed = subprocess.run([sys.executable, "-c", "import mlflow; print(sorted(e.name for e in "
                                 "mlflow.search_experiments()))"], env=env | client_env, capture_output=True,
                                text=True, timeout=300)
        assert listed.returncode == 0 and "'admins-experiment'" in listed.stdout, listed.stdout + listed.stderr[-2000:]
        own = runner.create_experiment("runners-experiment")
        for experiment in (own, shared):
            run = runner.create_run(experiment)
            runner.log_metric(run.info.run_id, "loss", 0.5)
            runner.log_text(run.info.run_id, "weights", "model/weights.txt")  # through MLflow's artifact proxy
            assert runner.download_artifacts(run.info.run_id, "model/weights.txt", str(tmp_path / experiment))
            runner.set_terminated(run.info.run_id)
        version = runner.create_model_version("admins-model", f"runs:/{run.info.run_id}/model", run.info.run_id)
        runner.set_registered_model_alias("admins-model", "champion", version.version)
        loser = runner.create_model_version("admins-model", f"runs:/{run.info.run_id}/model", run.info.run_id)
        runner.delete_model_version("admins-model", loser.version)
        assert runner.get_model_version_by_alias("admins-model", "champion").version == version.version

        made = show1(["stack", "backup", str(tmp_path / "backup"), "--dir", str(folder)], tmp_path, env)
        assert json.loads((tmp_path / "backup" / "manifest.json").read_text())["objects"] >= 2, made.stderr

        # Both UIs in a browser, as a person of the team opens them. Prefect's asks for the auth string (its own
        # login page), refuses a wrong one, and with the right one shows the stack's work pools; MLflow's asks the
        # browser for HTTP basic auth, and with the runner account it lists the admin's model.
        from browser import chromium, shown_text, text_once_shown

        prefect_ui = prefect_api.removesuffix("/api")
        with chromium(tmp_path / "chromium-profile") as browser:
            shown_text(browser, f"{prefect_ui}/work-pools", ["Login"])
            _log_in_to_prefect(browser, "admin:wrong")
            text_once_shown(browser, ["Authentication failed"])
            _log_in_to_prefect(browser, secrets["prefect_auth_string"])
            pools = shown_text(browser, f"{prefect_ui}/work-pools", ["Work Pools", "cpu", "gpu"])
            assert "Login" not in pools, pools
            # the account in the URL once (what the browser's prompt does), then the UI at its own address: the
            # browser sends the account along, from its cache of HTTP credentials, as it would after its prompt
            browser.get(f"http://show1:{secrets['mlflow_password']}@{uri.removeprefix('http://')}/")
            shown_text(browser, f"{uri}/#/models", ["admins-model"])

        # PostgreSQL: password only, and the password on no command line.
        port = state.ports["postgres"]
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", passfile=str(tmp_path / "none"),
                            connect_timeout=10)
        for service in state.services.values():
            for process in [psutil.Process(service.pid), *psutil.Process(service.pid).children(recursive=True)]:
                try:
                    command = " ".join(process.cmdline())
                except psutil.NoSuchProcess:  # a short-lived child that ended meanwhile
                    continue
                assert all(secret not in command for secret in secrets.values()), (service.name, command)
    finally:
        subprocess.run([*SHOW1, "stack", "down", "--dir", str(folder), "--purge"], cwd=tmp_path, env=env,
                       capture_output=True, timeout=600)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(refused_folder, ignore_errors=True)


def _log_in_to_prefect(browser: Any, auth_string: str) -> None:
    """Type `auth_string` into the Prefect UI's login page (its one password field) and submit it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    field = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, "input[type=password]"))
    field.clear()
    field.send_keys(auth_string)
    field.submit()


def test_a_training_tracked_in_the_demos_sqlite_store_is_copied_into_the_stack_when_registered(stack, tmp_path):
    """The newcomer's path of the issue: a clone trains as `make demo` does, tracked in the project's own sqlite store
    (no MLFLOW_TRACKING_URI); then `eval "$(show1 stack env)"` and the registration of that training on the stack.
    It used to fail ("training run … is not in the store http://…", retried to no effect); now the training is logged
    into the stack's MLflow once (a copy tagged with the run it copies), the version links to that copy, and a second
    registration copies nothing."""
    from show1.training.tracking import COPIED_FROM_TAG

    demo = fresh_clone(tmp_path / "demo")
    use_small_cascade(demo)
    params = yaml.safe_load((demo / "params.yaml").read_text())
    params["registry"] = {"model_prefix": "demo"}  # beside the fixture's show1-* models
    (demo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    show1(["curate", "--quiet"], demo, stack.base_env)
    show1(["train", "--stage", "base", "--quiet"], demo, stack.base_env)
    trained = (demo / "runs" / "base" / "mlflow_run_id").read_text().strip()
    assert (demo / "mlruns" / "mlflow.db").is_file()

    env = stack.env()
    first = show1(["register", "--stage", "base"], demo, env)
    assert "models:/demo-base/1" in first.stdout, first.stdout
    assert f"the training run {trained}" in " ".join((first.stdout + first.stderr).split()), first.stdout
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("demo-base", "challenger")
    copy = client.get_run(version.tags["training_run_id"])
    assert copy.info.run_id != trained and copy.data.tags[COPIED_FROM_TAG] == trained
    assert [m.step for m in client.get_metric_history(copy.info.run_id, "loss")] == [1, 2]

    second = show1(["register", "--stage", "base"], demo, env)
    assert "models:/demo-base/1" in second.stdout and f"the training run {trained}" not in second.stdout + \
        second.stderr, second.stdout
    experiments = [e.experiment_id for e in client.search_experiments()]
    copies = client.search_runs(experiments, filter_string=f"tags.`{COPIED_FROM_TAG}` = '{trained}'")
    assert [run.info.run_id for run in copies] == [copy.info.run_id]
