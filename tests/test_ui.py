"""`show1 ui`: the MLflow and Prefect UIs on a project's own stores, started by the command show1 prints, with the
runs made afterwards in them, as headless Chromium shows them; and what makes it robust (a busy port, a stale state
file, a second start, the stop)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import warm
from browser import chromium, requested_hosts, shown_text
from services import api
from typer.testing import CliRunner

from show1.cli import app
from show1.config import UI_FOLDER, UI_STATE, Tracking, running_ui_prefect_api, show1_command
from show1.stack.processes import group_alive
from show1.store import ui_command

ROOT = Path(__file__).resolve().parents[1]
REGISTER = ("from flows.register import register_flow\n"
            "register_flow(['base'], 'params.yaml', checkpoints={'base': 'weights/show-1-base'})\n")


def _project_env(tmp_path: Path) -> dict[str, str]:
    """A new shell in the project: no Prefect server and no MLflow store named (params' own, mlruns/mlflow.db)."""
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-client"), PYTHONPATH=str(ROOT))
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = warm.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_show1_ui_as_printed_serves_the_registry_and_the_flow_runs_made_after_it(tmp_path):
    """In a project: `show1 register` prints the command that opens the UIs; run as printed (on free ports) it
    serves both on the project's stores. A flow run made afterwards, with no PREFECT_API_URL, is on its Prefect
    server; in headless Chromium its Prefect UI lists that run (and asks nothing outside this machine) and its
    MLflow UI the registered model. A second `show1 ui` changes nothing; `show1 ui --stop` stops every process."""
    project, env = tmp_path, _project_env(tmp_path)  # params' store mlruns/mlflow.db: the conftest's empty copy
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    _run([sys.executable, "-m", "show1.cli", "init-weights", "--out", "weights"], project, env)
    registered = _run([sys.executable, "-m", "show1.cli", "register", "--stage", "base", "--checkpoint",
                       "weights/show-1-base"], project, env)
    [printed] = [line.removeprefix("browse: ") for line in registered.stdout.splitlines() if line.startswith("browse:")]
    command = shlex.split(printed.split("  (")[0])
    assert command[-1] == "ui" and "MLFLOW_TRACKING_URI" not in printed, printed
    state_file = project / UI_FOLDER / UI_STATE
    try:
        started = subprocess.run([*command, "--mlflow-port", "0", "--prefect-port", "0"], cwd=project, env=env,
                                 capture_output=True, text=True, timeout=400)
        assert started.returncode == 0, started.stdout + started.stderr
        state = json.loads(state_file.read_text())
        mlflow, prefect = (state["services"][name]["url"] for name in ("mlflow", "prefect"))
        assert f"MLflow:   {mlflow}  (this project's store: sqlite:///{project.resolve()}/mlruns/mlflow.db)" in \
            started.stdout, started.stdout
        assert f"Prefect:  {prefect}" in started.stdout

        flow = _run([sys.executable, "-c", REGISTER], project, env)
        assert f"View at {prefect}/runs/flow-run/" in flow.stdout + flow.stderr  # no temporary server started
        runs = api(f"{prefect}/api", "/flow_runs/filter", {"flows": {"name": {"any_": ["show1-register"]}}})
        assert [run["state_type"] for run in runs] == ["COMPLETED"], runs
        models = api(f"{mlflow}/api/2.0/mlflow", "/registered-models/search?max_results=10")["registered_models"]
        assert {"alias": "challenger", "version": "1"} in models[0]["aliases"] and models[0]["name"] == "show1-base"

        with chromium(tmp_path / "chromium-profile") as browser:
            shown_text(browser, prefect, ["Dashboard"])  # the address printed: Prefect's classic UI (see servers.py)
            assert "/v2" not in browser.current_url, browser.current_url
            page = shown_text(browser, f"{prefect}/runs", [runs[0]["name"], "show1-register"])
            assert "Can't connect to Server API" not in page
            shown_text(browser, f"{mlflow}/#/models", ["show1-base", "challenger"])
            hosts = requested_hosts(browser)
        assert hosts == {"127.0.0.1"}, hosts  # both UIs run offline: nothing asked outside this machine

        again = subprocess.run([*command], cwd=project, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "already runs" in again.stderr, again.stdout + again.stderr
        assert f"Prefect:  {prefect}" in again.stdout
        assert json.loads(state_file.read_text())["services"] == state["services"]  # the same processes
    finally:
        stopped = subprocess.run([*command, "--stop"], cwd=project, env=env, capture_output=True, text=True,
                                 timeout=120)
    assert stopped.returncode == 0 and "stopped: mlflow, prefect" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not state_file.exists()
    left = [name for name, service in state["services"].items() if group_alive(service["pid"])]
    assert not left, f"{left} still running after show1 ui --stop"
    assert (project / UI_FOLDER / "logs" / "prefect.log").is_file()


runner = CliRunner()


def test_a_busy_port_fails_clearly_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # other tests' servers in this worker
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["ui", "--mlflow-port", "0", "--prefect-port", str(port)])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert f"port {port} on 127.0.0.1 is in use" in message and "--prefect-port N" in message, message
    assert not (tmp_path / UI_FOLDER / UI_STATE).exists()
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], started


def _state(folder: Path, pid: int, started: float, ready: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    service = {"name": "prefect", "pid": pid, "started": started, "url": "http://127.0.0.1:4242", "log": "x"}
    (folder / UI_STATE).write_text(json.dumps({"folder": str(folder), "host": "127.0.0.1", "store": "sqlite:///x",
                                               "ready": ready, "services": {"prefect": service}}))
    return folder


def test_commands_use_a_running_ui_prefect_server_and_ignore_a_stale_or_unready_one(tmp_path):
    me = psutil.Process()
    assert running_ui_prefect_api(_state(tmp_path / "live", me.pid, me.create_time())) == "http://127.0.0.1:4242/api"
    assert running_ui_prefect_api(_state(tmp_path / "starting", me.pid, me.create_time(), ready=False)) is None
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert running_ui_prefect_api(_state(tmp_path / "stale", gone.pid, me.create_time())) is None
    # a pid the system gave to another process since: told apart by its start time
    assert running_ui_prefect_api(_state(tmp_path / "reused", me.pid, me.create_time() - 3600)) is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / UI_STATE).write_text("{not json")
    assert running_ui_prefect_api(tmp_path / "broken") is None
    assert running_ui_prefect_api(tmp_path / "none") is None


def test_a_command_started_in_the_folder_reports_to_the_ui_server_unless_told_otherwise(tmp_path):
    """A new process in the folder (Prefect not imported yet) takes the running UI's API; PREFECT_API_URL wins."""
    me = psutil.Process()
    _state(tmp_path / UI_FOLDER, me.pid, me.create_time())
    code = ("import os; from show1.config import apply_environment_defaults; apply_environment_defaults(); "
            "print(os.environ.get('PREFECT_API_URL'))")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    shown = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert shown.stdout.strip() == "http://127.0.0.1:4242/api", shown.stderr
    told = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env | {"PREFECT_API_URL": "http://x/api"},
                          capture_output=True, text=True)
    assert told.stdout.strip() == "http://x/api", told.stderr


def test_the_printed_ui_commands_run_from_where_they_are_printed(tmp_path, monkeypatch):
    script = Path(sys.executable).absolute().parent / "show1"
    if not script.is_file():
        pytest.skip("show1 is not installed beside this Python")
    monkeypatch.chdir(script.parent.parent)  # a project with its venv inside, as after `make demo`: .venv/bin/show1
    assert show1_command() == "bin/show1"
    monkeypatch.chdir(tmp_path)  # elsewhere: the whole path
    show1 = shlex.quote(str(script))
    assert show1_command() == show1
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert ui_command(Tracking()).startswith(f"{show1} ui  (")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other dir/mlflow.db")  # not params' store: named
    assert ui_command(Tracking()).startswith(f"MLFLOW_TRACKING_URI='sqlite:///other dir/mlflow.db' {show1} ui  (")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.com")
    assert ui_command(Tracking()) == "open http://mlflow.example.com (the tracking server's UI)"

    from flows.cascade import prefect_ui  # the demo's summary: `Prefect UI:`

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert prefect_ui().startswith(f"{show1} ui  (")  # the runs went to a temporary server
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # a stack's, or a running show1 ui's
    assert prefect_ui() == "open http://127.0.0.1:4200 (the Prefect server's UI)"
