"""`show1 run`: the whole lifecycle as one Prefect flow, in a fresh clone, as a new user runs it.

Two runs started at once in one folder: one waits for the other's lock, then redoes nothing that did not change;
the clone's working tree stays clean. The run that waited does its work on a saturated machine (2 busy processes
per core), beside the curation flow: each starts its own temporary Prefect server, the curation flow's on a new,
empty PREFECT_HOME (migrating its database under load: the slow start that Prefect's own 20 s limit failed), and
both finish. That machine is one core (CPU affinity, inherited by every process they start), so the rest of the
test session keeps the other cores.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pytest
from clone import fresh_clone, git, project_env, use_small_cascade
from load import busy_cores, on_cores, one_core, pin_process_tree
from mlflow.tracking import MlflowClient
from shared_cache import new_prefect_home

ROOT = Path(__file__).resolve().parents[1]
LOCK_WAIT = "waiting for it to finish"


def _env(prefect_home: Path) -> dict[str, str]:
    env = project_env(prefect_home)
    env.pop("MLFLOW_TRACKING_URI", None)  # the clone's own default store, mlruns/mlflow.db (it must stay ignored)
    return env


def start_run(project: Path, prefect_home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "show1.cli", "run", "--limit", "1"], cwd=project,
                            env=_env(prefect_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    ended: float  # time.monotonic() when it ended

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def finish(process: subprocess.Popen, timeout: float = 1500) -> Finished:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return Finished(process.returncode, stdout, stderr, time.monotonic())


@dataclass
class Project:
    folder: Path
    store: str
    first: Finished  # the run that got the lock: it curated, trained, registered, evaluated, promoted
    second: Finished  # the run that waited for it, then ran on a saturated machine, reusing everything
    curate_flow: Finished  # the curation flow, on the saturated machine at the same time
    busy: int  # how many busy-loop processes saturated the machine
    cores: int  # of how many cores
    seconds: dict[str, float]  # how long each took (the second and the curation flow: from the start of the load)


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared) -> Project:
    """A fresh clone with small params committed, where two `show1 run` start at the same moment, each with its own
    PREFECT_HOME (migrated already: the tests' template). When the one holding the lock is done, 2 busy-loop
    processes per core start, and the one that waited, with the curation flow beside it, runs under them: each
    starts its own temporary Prefect server, the curation flow's on an empty database (the migrations are the slow
    part; Prefect's own 20 s start-up limit failed there). The load, the run that waited and the curation flow (with
    their Prefect servers) share one core with 2 busy loops."""
    tmp = tmp_path_factory.mktemp("cascade")
    folder = fresh_clone(tmp / "clone")
    use_small_cascade(folder)
    started = time.monotonic()
    runs = [start_run(folder, new_prefect_home(shared, tmp / f"prefect-{i}")) for i in range(2)]
    with ThreadPoolExecutor(3) as pool:  # read every output as it comes (a full pipe would block its writer)
        waits = [pool.submit(finish, run) for run in runs]
        first_wait = next(as_completed(waits))
        second_wait = next(wait for wait in waits if wait is not first_wait)
        curate = [sys.executable, "-m", "flows.curate", str(ROOT / "data/manifests/demo.csv"), "--out",
                  str(tmp / "curated"), "--params", str(folder / "params.yaml")]
        core = one_core()
        pin_process_tree(runs[1 - waits.index(first_wait)].pid, core)  # it holds the lock now, or is about to
        with busy_cores(core) as busy:
            loaded = time.monotonic()
            curate_flow = subprocess.Popen(on_cores(core, curate), cwd=tmp, env=_env(tmp / "prefect-curate"), text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            curate_wait = pool.submit(finish, curate_flow)
            first, second, curate_done = first_wait.result(), second_wait.result(), curate_wait.result()
    timings = {"first": first.ended - started, "second": second.ended - loaded, "curate": curate_done.ended - loaded}
    return Project(folder, f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}", first, second, curate_done, busy, len(core),
                   timings)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_runs_at_once_one_waits_then_reuses_everything(project):
    first, second = project.first, project.second
    for run in (first, second):
        assert run.returncode == 0, run.output[-4000:]
    assert LOCK_WAIT not in first.stderr and LOCK_WAIT in second.stderr, second.stderr[-2000:]
    assert f"holds the lock {project.folder / '.show1-run.lock'}: pid " in " ".join(second.stderr.split())

    for flow in ("show1-cascade", "show1-curate", "show1-train", "show1-register", "show1-generate-evaluate",
                 "show1-promote"):
        assert f"for flow '{flow}'" in first.output, flow
    assert "Finished in state Completed" in first.output
    assert first.output.count(": 2 steps, final loss") == 4  # the small params reached every stage
    video = project.folder / "eval" / "videos" / "000.mp4"
    assert video.is_file() and (project.folder / "eval" / "report.html").is_file()
    for line in (f"video:          {video.relative_to(project.folder)}", "report:", "MLflow UI:      mlflow ui",
                 "Prefect UI:", "lineage:        show1 lineage"):
        assert line in first.stdout, line
    client = MlflowClient(tracking_uri=project.store, registry_uri=project.store)
    for stage in ("base", "interp", "sr1", "sr2"):
        assert str(client.get_model_version_by_alias(f"show1-{stage}", "challenger").version) == "1"
    # The evaluated stages passed the gate (no champion before): they are champions now.
    assert str(client.get_model_version_by_alias("show1-base", "champion").version) == "1"
    # The video leads back to its models and their training runs.
    lineage = subprocess.run([sys.executable, "-m", "show1.cli", "lineage", str(video)], cwd=project.folder,
                             env=_env(project.folder.parent / "prefect"), capture_output=True, text=True, timeout=300)
    assert lineage.returncode == 0 and "show1-base/1" in lineage.stdout and "training run" in lineage.stdout

    # The run that waited found everything done: it reused the training runs and the registered versions.
    assert second.output.count("unchanged inputs, reusing the finished run") == 4
    assert second.output.count("already registered as") == 4
    assert "evaluation: unchanged inputs, reusing eval" in second.output  # the same versions, prompts, settings
    assert [str(v.version) for v in client.search_model_versions("name = 'show1-sr1'")] == ["1"]


@pytest.mark.slow
def test_the_working_tree_stays_clean_after_show1_run(project):
    assert project.first.returncode == 0 and project.second.returncode == 0
    for written in ("eval", "runs", "data/curated", "data/validation", "mlruns/mlflow.db", ".show1-run.lock"):
        assert (project.folder / written).exists(), written  # the runs really wrote there
    assert git(project.folder, "status", "--porcelain") == ""


def test_run_no_wait_refuses_while_another_run_holds_the_lock(tmp_path):
    # Inputs that pass `show1 run`'s up-front check (which comes before the lock): the demo manifest.
    (tmp_path / "params.yaml").write_text(f"paths:\n  manifest: {ROOT / 'data/manifests/demo.csv'}\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom show1.run_lock import project_run_lock\n"
                               "with project_run_lock('.'):\n    print('locked', flush=True)\n    time.sleep(600)\n"],
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=_env(tmp_path))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        refused = subprocess.run([sys.executable, "-m", "show1.cli", "run", "--no-wait"], cwd=tmp_path,
                                 env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        message = " ".join(refused.stderr.split())
        assert f"holds the lock {tmp_path / '.show1-run.lock'}: pid {holder.pid}" in message, message
        assert "Traceback" not in refused.stderr and not (tmp_path / "runs").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, no stale lock is left behind
        holder.wait()
    from show1.run_lock import project_run_lock

    with project_run_lock(tmp_path, wait=False) as lock:
        assert lock == tmp_path / ".show1-run.lock"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_flows_finish_on_a_saturated_machine(project, capsys):
    done = {"show1 run": project.second, "curate flow": project.curate_flow}
    with capsys.disabled():
        print(f"\nunder load ({project.busy} busy processes on {project.cores} core): show1 run (reusing) "
              f"{project.seconds['second']:.0f} s, curate flow {project.seconds['curate']:.0f} s; "
              f"the first show1 run (training everything), before the load: {project.seconds['first']:.0f} s")
    assert project.busy == 2 * project.cores
    for name, run in done.items():
        assert run.returncode == 0, f"{name}:\n{run.output[-4000:]}"
        assert "Finished in state Completed" in run.output, name
        assert "Timed out while attempting to connect" not in run.output, name
    assert (project.folder.parent / "curated" / "index.jsonl").is_file()
    # The run under load reused every trained stage (the first run trained them).
    assert project.second.output.count("unchanged inputs, reusing the finished run") == 4


@pytest.mark.slow
def test_a_run_whose_manifest_keeps_nothing_leaves_the_curated_data_whole(project, shared, tmp_path):
    assert project.first.returncode == 0
    curated = project.folder / "data" / "curated"

    def published() -> dict[str, bytes]:
        files = [curated / "index.jsonl", curated / "quarantine.jsonl", curated / "summary.json",
                 *sorted((curated / "shards").iterdir())]
        return {f.relative_to(curated).as_posix(): f.read_bytes() for f in files}

    before = published()
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video")
    bad = tmp_path / "bad.csv"  # files that exist, every one rejected by curation
    bad.write_text("video,caption\nzero.mp4,an empty file\ntext.mp4,a text file named .mp4\n")
    refused = subprocess.run([sys.executable, "-m", "show1.cli", "run", "--manifest", str(bad)], cwd=project.folder,
                             env=_env(new_prefect_home(shared, tmp_path / "prefect")), capture_output=True, text=True,
                             timeout=900)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "nothing valid remains" in output, output[-3000:]
    assert published() == before  # the data the trained stages came from is still there, whole
    assert (curated / "refused" / "quarantine.jsonl").is_file()


@pytest.mark.slow
def test_a_terminated_run_stops_the_temporary_prefect_server_it_started(project, shared, tmp_path):
    """`kill PID` (SIGTERM) of a `show1 run` ends it as Ctrl-C does: Prefect stops the temporary server it started
    (a process of its own, which the default SIGTERM action would leave running)."""
    import signal

    import psutil

    assert project.first.returncode == 0
    process = subprocess.Popen([sys.executable, "-m", "show1.cli", "run", "--limit", "1"], cwd=project.folder,
                               env=_env(new_prefect_home(shared, tmp_path / "prefect")),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        servers: list[psutil.Process] = []
        deadline = time.monotonic() + 600
        while not servers and process.poll() is None and time.monotonic() < deadline:
            for child in psutil.Process(process.pid).children(recursive=True):
                try:
                    if "uvicorn" in child.cmdline():
                        servers.append(child)
                except psutil.Error:
                    continue
            time.sleep(0.2)
        assert servers, "the run started no temporary Prefect server"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) != 0
        _, alive = psutil.wait_procs(servers, timeout=120)
        assert not alive, f"the temporary Prefect server outlived the run: {[p.pid for p in alive]}"
    finally:
        process.kill()
        process.wait()
