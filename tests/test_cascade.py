"""`show1 run`: the whole lifecycle as one Prefect flow, in a fresh clone, as a new user runs it.

Two runs started at once in one folder: one waits for the other's lock, then redoes nothing that did not change;
the clone's working tree stays clean. The run that waited does its work on a saturated machine (2 busy processes
per core), beside the curation flow: each starts its own temporary Prefect server, the curation flow's on a new,
empty PREFECT_HOME (migrating its database under load: the slow start that Prefect's own 20 s limit failed), and
both finish. That machine is one core (CPU affinity, inherited by every process they start), so the rest of the
test session keeps the other cores. In the same project folder, the README's tested blocks run as written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pytest
from clone import fresh_clone, git, project_env, use_small_cascade
from load import busy_cores, on_cores, one_core, pin_process_tree
from mlflow.tracking import MlflowClient
from shared_cache import new_prefect_home

from show1.config import load_params
from show1.stack.processes import free_port

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
    show1 = Path(sys.executable).absolute().parent / "show1"  # as it runs from the project folder: `show1 ui`
    for line in (f"video:          {video.relative_to(project.folder)}", "report:", f"MLflow UI:      {show1} ui  (",
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


@pytest.mark.slow
def test_a_retraining_killed_midway_leaves_the_finished_run_whole(project, shared, tmp_path):
    """Changed inputs train a stage again beside its finished run (runs/.base.next), which is replaced only when the
    new one finishes: `show1 run` killed (SIGKILL) during that training leaves runs/base and its stage folder as
    they were."""
    import os
    import signal

    import yaml

    assert project.first.returncode == 0
    final = project.folder / "runs" / "base" / "final"
    before = {p.relative_to(final).as_posix(): p.read_bytes() for p in sorted(final.rglob("*")) if p.is_file()}
    params_file = project.folder / "params.yaml"
    committed = params_file.read_text()
    params = yaml.safe_load(committed)
    params["profiles"]["tiny"]["train_per_stage"]["base"]["max_steps"] = 3  # new inputs for base only
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(new_prefect_home(shared, tmp_path / "prefect")) | {"SHOW1_FAULT": "train.checkpoint.before_publish"}
    log = tmp_path / "run.log"  # a file, not a pipe: the temporary Prefect server the killed run leaves holds it
    with open(log, "w") as out:
        killed = subprocess.Popen([sys.executable, "-m", "show1.cli", "run", "--limit", "1"], cwd=project.folder,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            killed.wait(timeout=900)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(killed.pid, signal.SIGKILL)  # its temporary Prefect server, which a SIGKILL leaves behind
            killed.wait()
            params_file.write_text(committed)
    assert killed.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert (project.folder / "runs" / ".base.next" / "checkpoints").is_dir()  # it was training beside the old run
    after = {p.relative_to(final).as_posix(): p.read_bytes() for p in sorted(final.rglob("*")) if p.is_file()}
    assert after == before
    shutil.rmtree(project.folder / "runs" / ".base.next")


# ----------------------------------------------------------------------------------- the README's commands, as written

README_MARK = "<!-- tested: tests/test_cascade.py::test_the_readme_commands_run_as_shown -->"
SHELL_SYNTAX = re.compile(r"[$`|&;<>*~]")  # what a shell would expand or connect: the test runs no shell


@dataclass
class ReadmeBlock:
    line: int  # README.md's line of the block's opening fence
    language: str  # bash | python
    text: str  # without the indentation of a block inside a list item


def readme_blocks(readme: str) -> list[ReadmeBlock]:
    """The fenced blocks that come right after a README_MARK line."""
    lines = readme.splitlines()
    blocks = []
    for number, line in enumerate(lines, 1):
        if not line.strip().startswith("<!-- tested"):
            continue
        assert line.strip() == README_MARK, f"README.md:{number}: a tested mark reads exactly {README_MARK}"
        fence = re.fullmatch(r"( *)```(bash|python)", lines[number] if number < len(lines) else "")
        assert fence, f"README.md:{number}: the mark comes right before a ```bash or ```python block"
        body = []
        for text in lines[number + 1:]:
            if text.strip() == "```":
                break
            body.append(text.removeprefix(fence[1]))
        else:
            raise AssertionError(f"README.md:{number + 1}: the block never ends")
        blocks.append(ReadmeBlock(number + 1, fence[2], "\n".join(body)))
    return blocks


def readme_env(prefect_home: Path) -> dict[str, str]:
    """A new shell in the project folder: the venv not activated (its bin/ off PATH), no PYTHONPATH."""
    env = _env(prefect_home)
    venv_bin = Path(sys.prefix, "bin").resolve()
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p and Path(p).resolve() != venv_bin)
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def run_as_written(argv: list[str], folder: Path, env: dict[str, str], where: str,
                   stdin: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=folder, env=env, input=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{where}: {shlex.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    return done


def check_mlflow_ui(argv: list[str], folder: Path, env: dict[str, str], where: str, log: Path) -> None:
    """Start the server on a free port instead of the README's, ask it for the registry, stop it (its whole group).
    Without MLflow's job runner (GenAI jobs, which show1 has none of; ~25 CPU-s of worker processes at each start)."""
    assert "--port" in argv, f"{where}: a server the test starts is given a port"
    shown, argv = shlex.join(argv), list(argv)
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    with log.open("w") as output:
        server = subprocess.Popen(argv, cwd=folder, env=env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                  stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/search"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    answer = json.loads(response.read())
                break
            except urllib.error.HTTPError as error:
                raise AssertionError(f"{where}: {shown}: {url} answered {error.code}") from None
            except OSError:  # not listening yet
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{where}: {shown} (port {port}) never answered:\n{log.read_text()[-3000:]}") \
                        from None
                time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # what it started and left behind
    aliases = {m["name"]: {a["alias"] for a in m.get("aliases", [])} for m in answer.get("registered_models", [])}
    assert "champion" in aliases.get("show1-base", set()), \
        f"{where}: {shown} serves {sorted(aliases) or 'no model'}, not the project's store mlruns/mlflow.db"


def check_generate(argv: list[str], project: Project, env: dict[str, str], where: str) -> Path:
    """The video is written, from the registry versions REF names (the stages a stage=ref list leaves out: champion),
    with the profile's denoising steps."""
    done = run_as_written(argv, project.folder, env, where)
    video = project.folder / argv[argv.index("--out") + 1]
    assert video.is_file(), f"{where}: no {video}"
    client = MlflowClient(tracking_uri=project.store, registry_uri=project.store)
    run = client.get_run(re.search(r"generation run: (\w+)", done.stdout)[1])
    stages = argv[argv.index("--stages") + 1].split(",") if "--stages" in argv else ["base", "interp", "sr1", "sr2"]
    refs = argv[argv.index("--from-registry") + 1].split(",")
    named = dict(ref.split("=") for ref in refs if "=" in ref)
    plain = [ref for ref in refs if "=" not in ref]
    assert len(plain) <= 1, f"{where}: the test reads REF as one alias or version and stage=ref pairs"
    for stage in stages:
        ref = named.get(stage) or (plain[0] if plain else "champion")  # what a stage=ref list leaves out: champion
        version = ref if ref.isdigit() else client.get_model_version_by_alias(f"show1-{stage}", ref).version
        assert run.data.tags[f"model.{stage}"] == f"show1-{stage}/{version}", f"{where}: {stage} ({ref})"
    if "--steps" not in argv:
        steps = load_params(project.folder / "params.yaml").evaluate.steps
        label = str(steps) if isinstance(steps, int) else ",".join(f"{s}={n}" for s, n in steps.items())
        assert run.data.params["steps"] == label, f"{where}: the profile's steps ({label}) are the default"
    return video


def run_readme_command(argv: list[str], project: Project, env: dict[str, str], where: str, log: Path) -> str:
    """Run one command of a marked bash block as written (in `env`, which an `export` changes); what it was."""
    folder = project.folder
    if argv == ["make", "demo"]:
        # The fixture's `show1 run` in this folder is what `make demo` runs (the tiny profile, on smaller params).
        makefile = (folder / "Makefile").read_text()
        assert re.search(r"^demo:.*\n\t\$\(VENV\)/bin/show1 --profile tiny run$", makefile, re.M), makefile
        assert load_params(folder / "params.yaml").profile == "tiny"
        assert project.first.returncode == 0 and "Finished in state Completed" in project.first.output
        return "make demo"
    if argv[0] == "export":
        for assignment in argv[1:]:
            name, equals, value = assignment.partition("=")
            assert equals and name.isidentifier(), f"{where}: export NAME=VALUE …"
            env[name] = value
        return "export"
    if argv[:2] == [".venv/bin/mlflow", "ui"]:
        check_mlflow_ui(argv, folder, env, where, log)
        return "mlflow ui"
    if argv[:2] == [".venv/bin/show1", "lineage"]:
        done = run_as_written(argv, folder, env, where)
        for link in ("generation run", "model version show1-base/", "training run", "data_version"):
            assert link in done.stdout, f"{where}: no {link!r} in\n{done.stdout[-3000:]}"
        return "show1 lineage"
    if argv[:2] == [".venv/bin/show1", "generate"] and "--from-registry" in argv and "--out" in argv:
        check_generate(argv, project, env, where)
        return "show1 generate"
    raise AssertionError(f"{where}: {shlex.join(argv)}: the README test does not know how to run this (teach "
                         "run_readme_command in tests/test_cascade.py, or move it out of the marked block)")


def run_readme_python(code: str, folder: Path, env: dict[str, str], where: str) -> str:
    """Fed to `.venv/bin/python` in the project folder; what it prints is what its `print(…)  # …` lines say."""
    done = run_as_written([".venv/bin/python", "-"], folder, env, where, stdin=code + "\n")
    shown = [line.split("#", 1)[1].strip() for line in code.splitlines() if re.match(r"\s*print\(.*#", line)]
    assert shown, f"{where}: a tested Python block shows what it prints (print(…)  # the output)"
    assert done.stdout.splitlines() == shown, f"{where}: printed {done.stdout!r}, the README shows {shown}"
    return "python"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # with the fixture's `show1 run`s when this test runs alone
def test_the_readme_commands_run_as_shown(project, shared, tmp_path, capsys):
    """Every README block marked README_MARK runs as written in the project folder after `show1 run`, each block in a
    new shell (the venv not activated). The only adjustments: `.venv` is a link to the venv of the tests (ignored
    by git); `mlflow ui --port 5000` is started on a free port, without MLflow's job runner, asked over HTTP for the
    registry (show1-base@champion must be there) and stopped; `export` sets the environment of the commands after
    it; a Python block is fed to `.venv/bin/python` on stdin; `make demo` is the fixture's `show1 run`."""
    assert project.first.returncode == 0
    folder = project.folder
    blocks = readme_blocks((ROOT / "README.md").read_text())
    (folder / ".venv").symlink_to(sys.prefix)
    with (folder / ".git" / "info" / "exclude").open("a") as exclude:
        exclude.write("/.venv\n")
    prefect_home = new_prefect_home(shared, tmp_path / "prefect")
    ran: list[str] = []
    written: list[Path] = []
    started = time.monotonic()
    try:
        for block in blocks:
            env = readme_env(prefect_home)  # a new shell for each block
            if block.language == "python":
                ran.append(run_readme_python(block.text, folder, env, f"README.md:{block.line + 1}"))
                continue
            for offset, line in enumerate(block.text.splitlines(), 1):
                where = f"README.md:{block.line + offset}"
                argv = shlex.split(line, comments=True)
                if not argv:
                    continue
                assert not SHELL_SYNTAX.search(" ".join(argv)), f"{where}: {line!r}: shell syntax the test cannot run"
                if argv[:2] == [".venv/bin/show1", "generate"] and "--out" in argv:
                    written.append(folder / argv[argv.index("--out") + 1])
                ran.append(run_readme_command(argv, project, env, where, tmp_path / f"server-{block.line}.log"))
        for video in written:
            video.unlink()
        assert git(folder, "status", "--porcelain") == ""  # the commands wrote nothing else into the project
    finally:
        (folder / ".venv").unlink()
        for leftover in [*written, folder / "mlflow.db"]:  # the store an MLflow client that misses the project's makes
            leftover.unlink(missing_ok=True)
    with capsys.disabled():
        print(f"\nREADME: {len(ran)} commands in {len(blocks)} marked blocks in {time.monotonic() - started:.0f} s")
    # The commands the README must show working, in marked blocks (a mark removed is a command no longer tested).
    assert {"make demo", "export", "mlflow ui", "show1 lineage", "show1 generate", "python"} <= set(ran), ran
