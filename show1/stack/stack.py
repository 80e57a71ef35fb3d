"""`show1 stack up|down|status|env`: a team's stack on one machine, for local use and tests.

Started in order, each waited for until healthy: PostgreSQL → the S3 store → the MLflow tracking server and the
Prefect server → a Prefect worker on each work pool. Stopped in the reverse order. Everything lives in one folder
(default `.stack/`): `stack.json` (what runs where), `logs/`, `postgres/` (the databases), `s3/` (the bucket, saved
at `down`), `prefect-home/`. A `stack up` that fails stops what it started; a second `stack up` of a running stack
changes nothing, and one of a stack running in part starts its stopped services again on their recorded ports.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from show1 import atomic
from show1.config import OFFLINE_ENV
from show1.stack import object_store, postgres, servers
from show1.stack.processes import STOP_GRACE_S, Service, StackError, free_port, is_running, stop

STATE = "stack.json"
ORDER = ("postgres", "s3", "mlflow", "prefect", *(f"worker-{pool}" for pool in servers.WORK_POOLS))


class StackSettings(BaseModel):
    """How `show1 stack up` starts the stack."""

    folder: Path = Path(".stack")
    project: Path = Field(default_factory=Path.cwd)  # where the workers run flows (prefect.yaml, params.yaml)
    host: str = "127.0.0.1"  # where MLflow, Prefect and S3 listen; 0.0.0.0 serves other machines
    timeout: float = Field(300.0, gt=0)  # seconds each service may take to become healthy
    mlflow_workers: int = Field(2, ge=1)
    workers: bool = True  # start a Prefect worker on each work pool


class StackState(BaseModel):
    """What runs where; `stack.json` in the stack folder."""

    folder: str
    project: str
    host: str
    bucket: str = object_store.BUCKET
    mlflow_workers: int = 2
    workers: bool = True
    ports: dict[str, int] = {}  # kept when a stopped service is started again, so its clients' URLs stay valid
    services: dict[str, Service] = {}

    def url(self, name: str) -> str:
        return self.services[name].url

    def client_env(self) -> dict[str, str]:
        """The settings that point show1, MLflow, Prefect and DVC (s3fs/boto3) at this stack."""
        env = {}
        if "mlflow" in self.services:
            env["MLFLOW_TRACKING_URI"] = self.url("mlflow")
        if "prefect" in self.services:
            env["PREFECT_API_URL"] = f"{self.url('prefect')}/api"
        if "s3" in self.services:
            env |= object_store.client_env(self.url("s3"))
        return env

    def dvc_remote(self) -> str:
        return f"s3://{self.bucket}/dvc"


def state_path(folder: Path) -> Path:
    return Path(folder) / STATE


def read_state(folder: Path) -> StackState | None:
    path = state_path(folder)
    if not path.is_file():
        return None
    try:
        return StackState.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StackError(f"{path} is not a stack state file ({str(exc).splitlines()[0]}): move it aside") from None


def _write_state(state: StackState) -> None:
    atomic.write_text(state_path(Path(state.folder)), state.model_dump_json(indent=2) + "\n")


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One `stack up`/`stack down` at a time per folder (an OS lock: released if the holder is killed)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _server_env() -> dict[str, str]:
    env = dict(os.environ) | OFFLINE_ENV
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(key, None)
    return env


def up(settings: StackSettings, say: Callable[[str], None] = lambda _: None) -> StackState:
    """Start the stack in `settings.folder`. A stack that runs whole is left as it is; one that runs in part (a
    service died or was killed) gets its stopped services started again on their own ports, so the URLs its clients
    hold stay valid."""
    folder = settings.folder.resolve()
    with _exclusive(folder):
        state = read_state(folder)
        running = {name: is_running(service) for name, service in (state.services if state else {}).items()}
        if state is not None and running and all(running.values()):
            say(f"the stack in {folder} is already running")
            return state
        if state is not None and any(running.values()):
            say(f"the stack in {folder} runs in part: starting {', '.join(n for n, up in running.items() if not up)} "
                "again on the same ports")
        else:
            state = StackState(folder=str(folder), project=str(settings.project.resolve()), host=settings.host,
                               mlflow_workers=settings.mlflow_workers, workers=settings.workers)
        before = dict(state.services)
        try:
            _start_all(state, folder, settings.timeout, say)
        except BaseException:
            say("start-up failed: stopping what this start-up started")
            started = StackState(**(state.model_dump() | {"services": {
                name: service for name, service in state.services.items() if before.get(name) != service}}))
            _stop_all(started, say, save_bucket=False)
            if not before:
                state_path(folder).unlink(missing_ok=True)
            else:
                _write_state(state.model_copy(update={"services": before}))
            raise
        return state


def _ensure(state: StackState, name: str, start: Callable[[int], Service], host: str | None,
            say: Callable[[str], None]) -> tuple[Service, bool]:
    """The running service `name`, started (on its recorded port, else a free one on `host`; none when `host` is
    None) when it is not running. Returns it and whether it was started now."""
    current = state.services.get(name)
    if current is not None and is_running(current):
        return current, False
    port = 0 if host is None else state.ports.get(name) or free_port(host)
    service = start(port)
    if port:
        state.ports[name] = port
    state.services[name] = service
    _write_state(state)
    say(f"started {name} (pid {service.pid}), log {service.log}")
    return service, True


def _start_all(state: StackState, folder: Path, timeout: float, say: Callable[[str], None]) -> None:
    logs, env, host = folder / "logs", _server_env(), state.host
    data = folder / "postgres"
    postgres.init(data)
    pg, _ = _ensure(state, "postgres", lambda port: postgres.start_server(data, port, logs / "postgres.log"),
                    "127.0.0.1", say)
    pg_port = state.ports["postgres"]
    postgres.wait_ready(pg, timeout)
    postgres.create_databases(pg_port)

    s3, fresh = _ensure(state, "s3", lambda port: object_store.start_server(host, port, logs / "s3.log"), host, say)
    object_store.wait_ready(s3, timeout)
    if fresh:
        object_store.ensure_bucket(s3.url, state.bucket)
        restored = object_store.load(s3.url, folder / "s3", state.bucket)
        if restored:
            say(f"loaded {restored} saved objects from {folder / 's3'} into s3://{state.bucket}")

    env |= object_store.client_env(s3.url)
    mlflow, _ = _ensure(state, "mlflow", lambda port: servers.start_mlflow(
        host, port, pg_port, state.bucket, state.mlflow_workers, env, logs / "mlflow.log"), host, say)
    prefect, _ = _ensure(state, "prefect", lambda port: servers.start_prefect(
        host, port, pg_port, folder / "prefect-home", env, logs / "prefect.log"), host, say)
    servers.wait_mlflow(mlflow, timeout)
    servers.wait_prefect(prefect, timeout)

    if state.workers:
        api = f"{prefect.url}/api"
        worker_env = env | {"MLFLOW_TRACKING_URI": mlflow.url, "PREFECT_HOME": str(folder / "prefect-home")}
        started = []
        for pool in servers.WORK_POOLS:
            worker, _ = _ensure(state, f"worker-{pool}", lambda _port, pool=pool: servers.start_worker(
                pool, api, Path(state.project), worker_env, logs / f"worker-{pool}.log"), None, say)
            started.append((worker, pool))
        for worker, pool in started:
            servers.wait_worker(worker, api, pool, timeout)


def _stop_all(state: StackState, say: Callable[[str], None], save_bucket: bool) -> list[str]:
    stopped = []
    for name in reversed(ORDER):
        service = state.services.get(name)
        if service is None:
            continue
        if name == "s3" and save_bucket and is_running(service):
            count = object_store.save(service.url, Path(state.folder) / "s3", state.bucket)
            say(f"saved {count} objects of s3://{state.bucket} to {Path(state.folder) / 's3'}")
        how = stop(service)
        if how != "not running":
            stopped.append(name)
            say(f"stopped {name}" if how == "stopped" else
                f"killed {name}: it did not stop within {STOP_GRACE_S:.0f} s of "
                f"{signal.Signals(service.stop_signal).name} (see {service.log})")
    return stopped


def down(folder: Path, purge: bool = False, say: Callable[[str], None] = lambda _: None) -> list[str]:
    """Stop every service of the stack in `folder` (saving the bucket first); `purge` also deletes its data
    (databases, saved bucket, Prefect home), keeping the logs. Returns the names of the services that were running."""
    folder = Path(folder).resolve()
    with _exclusive(folder):
        state = read_state(folder)
        stopped = []
        if state is not None:
            try:
                stopped = _stop_all(state, say, save_bucket=not purge)
            except StackError as exc:  # the bucket could not be saved: stop anyway, say what was lost
                say(f"warning: {exc}")
                stopped = _stop_all(state, say, save_bucket=False)
            state_path(folder).unlink(missing_ok=True)
        if purge:
            for name in ("postgres", "s3", "prefect-home"):
                shutil.rmtree(folder / name, ignore_errors=True)
        return stopped


def health(state: StackState) -> dict[str, bool]:
    """Each service: running and answering the same health check `up` waits for."""
    checks: dict[str, Callable[[Service], bool]] = {
        "postgres": postgres.healthy, "s3": object_store.healthy, "mlflow": servers.mlflow_healthy,
        "prefect": servers.prefect_healthy}
    api = state.client_env().get("PREFECT_API_URL", "")
    for pool in servers.WORK_POOLS:
        checks[f"worker-{pool}"] = lambda service, pool=pool: servers.worker_healthy(service, api, pool)
    return {name: is_running(service) and checks[name](service) for name, service in state.services.items()}


def export_lines(state: StackState) -> list[str]:
    """`export K=V` lines for a POSIX shell: `eval "$(show1 stack env)"`."""
    return [f"export {key}={shlex.quote(value)}" for key, value in state.client_env().items()]
