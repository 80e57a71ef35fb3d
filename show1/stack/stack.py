"""`show1 stack up|down|status|env`: a team's stack on one machine, for local use and tests.

Started in order, each waited for until healthy: PostgreSQL → the S3 store → the MLflow tracking server and the
Prefect server → a Prefect worker on each work pool. Stopped in the reverse order. Everything lives in one folder
(default `.stack/`): `stack.json` (what runs where), `logs/`, `postgres/` (the databases), `s3/` (the bucket, saved
at `down`), `prefect-home/`. A `stack up` that fails stops what it started; a second `stack up` of a running stack
changes nothing, and one of a stack running in part starts its stopped services again on their recorded ports.
Beyond loopback every service requires credentials (`credentials` in the folder: show1/stack/credentials.py);
`show1 stack backup|restore` is show1/stack/backup.py.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from show1 import atomic
from show1.config import OFFLINE_ENV
from show1.stack import credentials, object_store, postgres, servers
from show1.stack.processes import STOP_GRACE_S, Service, StackError, folder_lock, free_port, is_running, stop

STATE = "stack.json"
# Artifacts go through the MLflow server, both ways. Its S3 artifact store makes it offer clients presigned URLs of the
# store instead (downloads of every size; uploads over 500 MB), and those name the address the server reaches the
# store at, 127.0.0.1: on another machine every model download failed ("Connection refused" on the runner's own
# loopback), and a stack with credentials keeps the store on loopback anyway.
PROXIED_ARTIFACTS = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false"}
ORDER = ("postgres", "s3", "mlflow", "prefect", *(f"worker-{pool}" for pool in servers.WORK_POOLS))


class StackSettings(BaseModel):
    """How `show1 stack up` starts the stack."""

    folder: Path = Path(".stack")
    project: Path = Field(default_factory=Path.cwd)  # where the workers run flows (prefect.yaml, params.yaml)
    host: str = "127.0.0.1"  # where MLflow, Prefect and S3 listen; 0.0.0.0 serves other machines
    timeout: float = Field(300.0, gt=0)  # seconds each service may take to become healthy
    mlflow_workers: int = Field(2, ge=1)
    workers: bool = True  # start a Prefect worker on each work pool of `pools`
    # The work pools that get a worker on this machine. A team whose GPU runners are other machines starts the stack
    # with ("cpu",): the `gpu` pool's runs then go to the workers those machines start (`show1 worker --pool gpu`).
    pools: tuple[str, ...] = servers.WORK_POOLS

    @field_validator("pools")
    @classmethod
    def _known_pools(cls, pools: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [pool for pool in pools if pool not in servers.WORK_POOLS]
        if unknown:
            raise ValueError(f"unknown work pools {unknown}: prefect.yaml deploys to {', '.join(servers.WORK_POOLS)}")
        return tuple(dict.fromkeys(pools))
    # Every service requires credentials (show1/stack/credentials.py). None: on beyond loopback, off on 127.0.0.1
    # alone; False is refused beyond loopback. A stack folder with credentials keeps them.
    credentials: bool | None = None


class StackState(BaseModel):
    """What runs where; `stack.json` in the stack folder."""

    folder: str
    project: str
    host: str
    bucket: str = object_store.BUCKET
    mlflow_workers: int = 2
    workers: bool = True
    pools: tuple[str, ...] = servers.WORK_POOLS  # the work pools with a worker of the stack's own
    credentials: bool = False  # its services require the credentials in `credentials` in its folder
    ports: dict[str, int] = {}  # kept when a stopped service is started again, so its clients' URLs stay valid
    services: dict[str, Service] = {}

    def url(self, name: str) -> str:
        return self.services[name].url

    def client_env(self) -> dict[str, str]:
        """The settings that point show1, MLflow, Prefect and DVC (s3fs/boto3) at this stack."""
        env = {}
        if "mlflow" in self.services:
            env["MLFLOW_TRACKING_URI"] = self.url("mlflow")
            env |= PROXIED_ARTIFACTS
        if "prefect" in self.services:
            env["PREFECT_API_URL"] = f"{self.url('prefect')}/api"
            env |= {k: v for k, v in servers.CLIENT_RETRIES.items() if k not in os.environ}
        if "s3" in self.services:
            env |= object_store.client_env(self.url("s3"))
        if self.credentials and (secrets := credentials.read(Path(self.folder))) is not None:
            env |= secrets.client_env()
        return env

    def pgpass(self) -> Path | None:
        """The password file of its PostgreSQL when it has credentials on."""
        return Path(self.folder) / credentials.PGPASS if self.credentials else None

    def secrets(self) -> credentials.Credentials | None:
        """The stack's credentials when it has them on."""
        return credentials.read(Path(self.folder)) if self.credentials else None

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
    with folder_lock(folder):
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
                               mlflow_workers=settings.mlflow_workers, workers=settings.workers,
                               pools=settings.pools, credentials=_credentials_on(settings, folder))
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


def _credentials_on(settings: StackSettings, folder: Path) -> bool:
    if credentials.loopback_only(settings.host):
        return bool(settings.credentials) or credentials.path(folder).is_file()
    if settings.credentials is False:
        raise StackError(f"a stack on {settings.host} serves other machines and cannot run without credentials "
                         "(--no-credentials is for 127.0.0.1 alone)")
    return True


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
    if postgres.requires_password(data) and not credentials.path(folder).is_file():
        raise StackError(f"the databases in {data} require the password kept in {credentials.path(folder)}, which "
                         "is missing: put that file back (from a copy of the stack folder), or start over with "
                         f"`show1 stack down --purge --dir {folder}`, which deletes the runs and the registry "
                         "(`show1 stack restore` brings back a backup onto the new stack)")
    if state.credentials:
        credentials.check_installed()
    secrets = credentials.ensure(folder) if state.credentials else None
    passfile = credentials.write_pgpass(folder, secrets, postgres.SUPERUSER) if secrets else None
    postgres.init(data)
    pg, _ = _ensure(state, "postgres", lambda port: postgres.start_server(data, port, logs / "postgres.log",
                                                                          passfile), "127.0.0.1", say)
    pg_port = state.ports["postgres"]
    postgres.wait_ready(pg, timeout)
    if secrets:
        postgres.require_password(pg, data, pg_port, secrets.postgres_password, passfile)
    postgres.create_databases(pg_port, (*postgres.DATABASES, credentials.AUTH_DATABASE) if secrets else
                              postgres.DATABASES, passfile=passfile)

    # moto cannot enforce access keys: with credentials the store stays on loopback, behind MLflow's artifact proxy.
    s3_host = "127.0.0.1" if secrets else host
    s3, fresh = _ensure(state, "s3", lambda port: object_store.start_server(s3_host, port, logs / "s3.log"), s3_host,
                        say)
    object_store.wait_ready(s3, timeout)
    if fresh:
        object_store.ensure_bucket(s3.url, state.bucket)
        restored = object_store.load(s3.url, folder / "s3", state.bucket)
        if restored:
            say(f"loaded {restored} saved objects from {folder / 's3'} into s3://{state.bucket}")

    env |= object_store.client_env(s3.url)
    auth_config = credentials.write_mlflow_auth_config(folder, secrets, postgres.url(
        pg_port, credentials.AUTH_DATABASE, "psycopg", passfile=passfile)) if secrets else None
    auth_string = secrets.prefect_auth_string if secrets else None
    mlflow, _ = _ensure(state, "mlflow", lambda port: servers.start_mlflow(
        host, port, pg_port, state.bucket, state.mlflow_workers, env, logs / "mlflow.log", passfile, auth_config,
        secrets.mlflow_secret_key if secrets else None), host, say)
    prefect, _ = _ensure(state, "prefect", lambda port: servers.start_prefect(
        host, port, pg_port, folder / "prefect-home", env, logs / "prefect.log",
        secrets.postgres_password if secrets else None, auth_string), host, say)
    servers.wait_mlflow(mlflow, timeout)
    servers.wait_prefect(prefect, timeout)
    if secrets:
        credentials.ensure_mlflow_user(mlflow.url, secrets)
    servers.ensure_work_pools(f"{prefect.url}/api", servers.WORK_POOLS, auth_string)

    if state.workers:
        api = f"{prefect.url}/api"
        worker_env = env | {"MLFLOW_TRACKING_URI": mlflow.url, "PREFECT_HOME": str(folder / "prefect-home")}
        if secrets:
            worker_env |= secrets.client_env()
        started = []
        for pool in state.pools:
            worker, _ = _ensure(state, f"worker-{pool}", lambda _port, pool=pool: servers.start_worker(
                pool, api, Path(state.project), worker_env, logs / f"worker-{pool}.log"), None, say)
            started.append((worker, pool))
        for worker, pool in started:
            servers.wait_worker(worker, api, pool, timeout, auth_string)


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
    with folder_lock(folder):
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
            for name in (credentials.FILE, credentials.PGPASS, credentials.MLFLOW_AUTH_INI):
                (folder / name).unlink(missing_ok=True)
        return stopped


@contextlib.contextmanager
def paused(folder: Path, timeout: float = 300.0, say: Callable[[str], None] = lambda _: None) -> Iterator[StackState]:
    """The running stack in `folder` with its servers and workers stopped (PostgreSQL and the S3 store keep running),
    for work on their data that they must not see half done; afterwards they start again on their own ports, even
    when the work failed. No `stack up` or `down` runs meanwhile."""
    folder = Path(folder).resolve()
    with folder_lock(folder):
        state = read_state(folder)
        if state is None:
            raise StackError(f"no stack runs in {folder} (show1 stack up --dir {folder})")
        for name in reversed(ORDER):
            service = state.services.get(name)
            if name not in ("postgres", "s3") and service is not None and stop(service) != "not running":
                say(f"stopped {name}")
        try:
            yield state
        except BaseException:
            try:
                _start_all(state, folder, timeout, say)
            except StackError as exc:  # the work's own error is the one to report
                say(f"warning: {exc}")
            raise
        _start_all(state, folder, timeout, say)


def health(state: StackState) -> dict[str, bool]:
    """Each service: running and answering the same health check `up` waits for."""
    checks: dict[str, Callable[[Service], bool]] = {
        "postgres": postgres.healthy, "s3": object_store.healthy, "mlflow": servers.mlflow_healthy,
        "prefect": servers.prefect_healthy}
    api = state.client_env().get("PREFECT_API_URL", "")
    auth_string = secrets.prefect_auth_string if (secrets := state.secrets()) else None
    for pool in state.pools:
        checks[f"worker-{pool}"] = lambda service, pool=pool: servers.worker_healthy(service, api, pool, auth_string)
    return {name: is_running(service) and checks[name](service) for name, service in state.services.items()}


def export_lines(state: StackState) -> list[str]:
    """`export K=V` lines for a POSIX shell: `eval "$(show1 stack env)"`."""
    lines = [f"export {key}={shlex.quote(value)}" for key, value in state.client_env().items()]
    if state.credentials and "s3" in state.services:
        lines.append("# AWS_*: the stack's S3 store listens on its host's 127.0.0.1 only (DVC there); other machines "
                     "reach MLflow's artifacts through the MLflow server")
    return lines
