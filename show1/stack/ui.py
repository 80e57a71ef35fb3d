"""`show1 ui`: the MLflow and Prefect UIs on this project's own stores, for one person without a team's stack.

MLflow: `mlflow ui` on params' tracking store (the embedded sqlite store, `mlruns/`; with MLFLOW_TRACKING_URI naming
a tracking server, that server's own UI and no MLflow process here). Prefect: `prefect server start` with its sqlite
database in `.show1-ui/prefect-home/`. Both run in the background with their logs in `.show1-ui/logs/`, and
`.show1-ui/ui.json` says what runs where. While that Prefect server runs, show1's commands started in this folder
with no PREFECT_API_URL of their own report their flow runs to it (show1.config.apply_environment_defaults), so
every run made after `show1 ui` shows in its UI. `show1 ui --stop` stops both.

A second `show1 ui` of a running one changes nothing; a state file whose processes are gone (a reboot, a kill) is
ignored, and `show1 ui` starts both again. A start-up that fails (a port in use, a server that does not answer)
stops what it started.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

from show1 import atomic
from show1.config import OFFLINE_ENV, UI_FOLDER, UI_STATE, Tracking, tracking_uri
from show1.stack import servers
from show1.stack.processes import Service, StackError, folder_lock, free_port, is_running, stop
from show1.store import artifact_location, connect, sqlite_path

ORDER = ("mlflow", "prefect")


class UISettings(BaseModel):
    """How `show1 ui` starts the UIs."""

    host: str = "127.0.0.1"  # 0.0.0.0 serves other machines
    mlflow_port: int = Field(5000, ge=0, lt=65536)  # 0: a free port
    prefect_port: int = Field(4200, ge=0, lt=65536)
    timeout: float = Field(300.0, gt=0)  # seconds each server may take to answer


class UIState(BaseModel):
    """What runs where: `.show1-ui/ui.json`. show1.config reads `services.prefect` and `ready` from it."""

    folder: str
    host: str
    store: str  # the MLflow store the UI shows: a sqlite URI served here, or a tracking server's URL
    ready: bool = False  # both answered: only then do show1's commands send their flow runs to the Prefect server
    services: dict[str, Service] = {}

    def running(self) -> bool:
        """Whether it started whole and every server of it still runs."""
        return self.ready and bool(self.services) and all(is_running(service) for service in self.services.values())


def folder_of(project: Path) -> Path:
    return (project / UI_FOLDER).resolve()


def read_state(folder: Path) -> UIState | None:
    """The state file in `folder`, or None when there is none or it cannot be read (a stale one is still returned:
    `running()` tells)."""
    try:
        return UIState.model_validate_json((folder / UI_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_state(state: UIState) -> None:
    atomic.write_text(Path(state.folder) / UI_STATE, state.model_dump_json(indent=2) + "\n")


def _port(host: str, port: int, option: str) -> int:
    """`port`, checked free on `host` (0: a free one), so a busy port fails before anything starts."""
    if port == 0:
        return free_port(host)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StackError(f"port {port} on {host} is in use ({exc.strerror}): is another `show1 ui`, `mlflow ui` "
                             f"or `prefect server start` running? Stop it, or pick another port ({option} N; 0 "
                             "picks a free one)") from None
    return port


def _server_env() -> dict[str, str]:
    env = dict(os.environ) | OFFLINE_ENV
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(key, None)
    return env


def up(project: Path, tracking: Tracking, settings: UISettings,
       say: Callable[[str], None] = lambda _: None) -> UIState:
    """Start the UIs for the project in `project` on `tracking`'s store, or return the running ones unchanged."""
    folder = folder_of(project)
    with folder_lock(folder):
        state = read_state(folder)
        if state is not None and state.running():
            say(f"show1 ui already runs for {project} (show1 ui --stop, then show1 ui, to change its settings)")
            return state
        if state is not None:  # stale, or half of it running, or a start-up that was killed: start afresh
            _stop_all(state, say)
            (folder / UI_STATE).unlink(missing_ok=True)
        uri = tracking_uri(tracking)
        db = sqlite_path(uri)
        mlflow_port = _port(settings.host, settings.mlflow_port, "--mlflow-port") if db is not None else None
        prefect_port = _port(settings.host, settings.prefect_port, "--prefect-port")
        store, artifacts = uri, None
        if db is not None:
            connect(tracking)  # a store that does not exist yet is created whole here, not by `mlflow ui` in place
            store, artifacts = f"sqlite:///{db.resolve()}", artifact_location(tracking)
        state = UIState(folder=str(folder), host=settings.host, store=store)
        try:
            _start_all(state, folder, mlflow_port, prefect_port, artifacts, settings.timeout, say)
        except BaseException:
            say("start-up failed: stopping what it started")
            _stop_all(state, say)
            (folder / UI_STATE).unlink(missing_ok=True)
            raise
        return state


def _start_all(state: UIState, folder: Path, mlflow_port: int | None, prefect_port: int, artifacts: str | None,
               timeout: float, say: Callable[[str], None]) -> None:
    logs, env, host = folder / "logs", _server_env(), state.host

    def started(service: Service) -> Service:
        state.services[service.name] = service
        _write_state(state)  # at once: should this start-up be killed, the next `show1 ui` or --stop stops it
        say(f"started {service.name} (pid {service.pid}), log {service.log}")
        return service

    mlflow = None
    if mlflow_port is not None and artifacts is not None:
        mlflow = started(servers.start_mlflow_ui(host, mlflow_port, state.store, artifacts, env, logs / "mlflow.log"))
    prefect = started(servers.start_prefect(host, prefect_port, None, folder / "prefect-home", env,
                                            logs / "prefect.log"))
    if mlflow is not None:
        servers.wait_mlflow(mlflow, timeout)
    servers.wait_prefect(prefect, timeout)
    state.ready = True
    _write_state(state)


def _stop_all(state: UIState, say: Callable[[str], None]) -> list[str]:
    stopped = []
    for name in ORDER:
        service = state.services.get(name)
        if service is not None and stop(service) != "not running":
            stopped.append(name)
            say(f"stopped {name}")
    return stopped


def down(project: Path, say: Callable[[str], None] = lambda _: None) -> list[str]:
    """Stop the UIs of the project in `project`; the names of those that were running. Their data (the Prefect
    server's database, the logs) stays for the next `show1 ui`."""
    folder = folder_of(project)
    if not folder.is_dir():
        return []
    with folder_lock(folder):
        state = read_state(folder)
        stopped = _stop_all(state, say) if state is not None else []
        (folder / UI_STATE).unlink(missing_ok=True)
        return stopped
