"""The application servers of the local stack: the MLflow tracking server (PostgreSQL + S3 artifacts), the Prefect
server (PostgreSQL) and one Prefect process worker per work pool of `prefect.yaml` (`cpu`, `gpu`); and those of
`show1 ui` (show1/stack/ui.py): `mlflow ui` on the project's sqlite store, the Prefect server on its own sqlite file."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from show1.stack import postgres
from show1.stack.processes import Service, StackError, http_ok, start, wait_until

WORK_POOLS = ("cpu", "gpu")  # the pools prefect.yaml deploys to
ARTIFACTS_PREFIX = "mlflow"  # s3://BUCKET/mlflow: the tracking server's artifact store
PREFECT = [sys.executable, "-m", "prefect"]


def local_url(host: str, port: int) -> str:
    """The URL this machine's clients use (a server bound to every interface is reached on 127.0.0.1)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def start_mlflow(host: str, port: int, pg_port: int, bucket: str, workers: int, env: Mapping[str, str],
                 log: Path, passfile: Path | None = None, auth_config: Path | None = None,
                 secret_key: str | None = None) -> Service:
    """`mlflow server` with its runs, registry and aliases in PostgreSQL and its artifacts in s3://bucket/mlflow,
    served through the server (clients need no S3 credentials: `mlflow-artifacts:/` URIs). With credentials:
    PostgreSQL's password from `passfile`, and the basic-auth app configured by `auth_config`, its CSRF tokens signed
    with `secret_key`."""
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
            postgres.url(pg_port, "mlflow", "psycopg", passfile=passfile),
            "--artifacts-destination", f"s3://{bucket}/{ARTIFACTS_PREFIX}", "--host", host, "--port", str(port),
            "--workers", str(workers)]
    server_env = _mlflow_env(env)
    if auth_config is not None:
        argv += ["--app-name", "basic-auth"]
        server_env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
        server_env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret_key or ""
    hosts = allowed_hosts(host, port)
    if hosts and not server_env.get("MLFLOW_SERVER_ALLOWED_HOSTS"):  # a user's own list wins
        server_env["MLFLOW_SERVER_ALLOWED_HOSTS"] = ",".join(hosts)
    return start("mlflow", argv, log=log, url=local_url(host, port), env=server_env)


def allowed_hosts(host: str, port: int) -> list[str]:
    """The Host headers MLflow accepts when it listens beyond loopback (empty: MLflow's default, loopback and private
    networks). MLflow refuses any other with 403 "Invalid Host header - possible DNS rebinding attack detected", which
    turned away every client of a stack on 127.0.0.2 or on a public address: its defaults, plus the address it listens
    on, and on 0.0.0.0 this machine's names and interface addresses."""
    if host in ("127.0.0.1", "localhost"):
        return []
    import socket

    import psutil
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = {host}
    if host in ("0.0.0.0", "::"):
        names |= {socket.gethostname(), socket.getfqdn()}
        names |= {address.address.split("%")[0] for addresses in psutil.net_if_addrs().values()
                  for address in addresses if address.family in (socket.AF_INET, socket.AF_INET6)}
    shown = sorted(f"[{name}]" if ":" in name else name for name in names if name)
    return [*get_default_allowed_hosts(), *shown, *(f"{name}:{port}" for name in shown)]


def start_mlflow_ui(host: str, port: int, store: str, artifacts: str, env: Mapping[str, str], log: Path) -> Service:
    """`mlflow ui` on the sqlite store `store` (new experiments' artifacts under `artifacts`), one worker: the UI of one
    person's project."""
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--default-artifact-root", artifacts,
            "--host", host, "--port", str(port), "--workers", "1"]
    return start("mlflow", argv, log=log, url=local_url(host, port), env=_mlflow_env(env))


def _mlflow_env(env: Mapping[str, str]) -> dict[str, str]:
    # MLflow's job runner (GenAI scorers, prompt optimisation, trace roll-ups: nothing show1 uses) would start 8
    # huey consumer processes beside the server, ~250 MB each; a user who wants it sets the variable to true.
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}


def mlflow_healthy(service: Service) -> bool:
    return http_ok(f"{service.url}/health")


def wait_mlflow(service: Service, timeout: float) -> None:
    wait_until(service, lambda: mlflow_healthy(service), timeout, "healthy")


# Where the Prefect UI asks for its API. Unset, Prefect's UI asks http://127.0.0.1:4200/api whatever port the server
# runs on (`--port` moves the server, not what its UI is told), so it showed "Can't connect to Server API" and no run.
# Relative, the browser asks the address it loaded the UI from: 127.0.0.1, this machine's address on the network for a
# server on 0.0.0.0, or the local end of an SSH tunnel. A user's own setting (a reverse proxy's URL) wins.
PREFECT_UI_API = "/api"
PREFECT_UI_API_SETTINGS = ("PREFECT_SERVER_UI_API_URL", "PREFECT_UI_API_URL")  # Prefect 3's name and its older alias


def start_prefect(host: str, port: int, pg_port: int | None, home: Path, env: Mapping[str, str],
                  log: Path, pg_password: str | None = None, auth_string: str | None = None) -> Service:
    """`prefect server start`, the UI on the same port and told where its API is; its database PostgreSQL's
    `prefect` on `pg_port`, or with none, Prefect's own sqlite file in `home`. With credentials: PostgreSQL's
    password (in its environment) and the API auth string every client must send."""
    server_env = {**env, "PREFECT_HOME": str(home)}
    server_env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    if pg_port is not None:
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres.url(pg_port, "prefect", "asyncpg",
                                                                         password=pg_password)
    if auth_string is not None:  # the server's own client (its UI's, its services') sends it too
        server_env["PREFECT_SERVER_API_AUTH_STRING"] = server_env["PREFECT_API_AUTH_STRING"] = auth_string
    if not any(server_env.get(name) for name in PREFECT_UI_API_SETTINGS):
        server_env[PREFECT_UI_API_SETTINGS[0]] = PREFECT_UI_API
    # The new UI (v2, the default of Prefect 3.9) asks amplitude.com for its analytics settings on every page even
    # with analytics off; the classic one asks nothing outside. A user who wants v2 sets the variable to true, or
    # opens /v2.
    server_env.setdefault("PREFECT_SERVER_UI_V2_ENABLED", "false")
    server_env.pop("PREFECT_API_URL", None)
    argv = [*PREFECT, "server", "start", "--host", host, "--port", str(port)]
    return start("prefect", argv, log=log, url=local_url(host, port), env=server_env)


def prefect_healthy(service: Service) -> bool:
    return http_ok(f"{service.url}/api/health")


def wait_prefect(service: Service, timeout: float) -> None:
    wait_until(service, lambda: prefect_healthy(service), timeout, "healthy")


# While PostgreSQL is down (killed, restarting) the Prefect server answers 500, not 503: asyncpg's refused connection
# is an OSError, which Prefect does not count as retryable. Its clients retry 429, 502 and 503 only, so a flow run lost
# the log lines it sent then (and would lose a state change). The stack's workers and their flow runs, and every
# client of `show1 stack env`, retry 500 too; a user's own setting wins.
CLIENT_RETRIES = {"PREFECT_CLIENT_RETRY_EXTRA_CODES": "500"}


def worker_name(pool: str) -> str:
    return f"show1-{pool}"


def start_worker(pool: str, api_url: str, project: Path, env: Mapping[str, str], log: Path) -> Service:
    """A process worker polling `pool`; it creates the pool when missing. Flow runs start in `project`
    (SHOW1_HOME, which prefect.yaml's pull step changes into) with the stack's settings."""
    worker_env = CLIENT_RETRIES | {**env, "PREFECT_API_URL": api_url, "SHOW1_HOME": str(project)}
    argv = worker_command(pool, worker_name(pool))
    return start(f"worker-{pool}", argv, log=log, url=f"{api_url}/work_pools/{pool}", env=worker_env, cwd=project)


def worker_command(pool: str, name: str, queues: Sequence[str] = ()) -> list[str]:
    """`prefect worker start` of a process worker polling `pool` (created when missing) as `name`, only `queues` of it
    when given; flow runs start where SHOW1_HOME points (prefect.yaml's pull step)."""
    return [*PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--name", name, "--install-policy",
            "never", *(arg for queue in queues for arg in ("--work-queue", queue))]


def _prefect_post(api_url: str, path: str, body: dict, auth_string: str | None) -> Any:
    from show1.stack.credentials import prefect_headers

    request = urllib.request.Request(f"{api_url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **prefect_headers(auth_string)})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def ensure_work_pools(api_url: str, pools: Sequence[str], auth_string: str | None = None) -> None:
    """Create each work pool prefect.yaml deploys to (a process pool) unless it exists: a pool that no worker of the
    stack serves (`gpu`, served by runners on other machines) must exist before anything is deployed to it."""
    for pool in pools:
        try:
            _prefect_post(api_url, "/work_pools/", {"name": pool, "type": "process"}, auth_string)
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # 409: it exists
                raise StackError(f"the Prefect server at {api_url} refused to create the work pool {pool!r} "
                                 f"({exc.code}): {exc.read().decode(errors='replace')[:300]}") from None
        except OSError as exc:
            raise StackError(f"the Prefect server at {api_url} could not create the work pool {pool!r}: {exc}") \
                from None


def online_workers(api_url: str, pool: str, auth_string: str | None = None) -> list[str]:
    """Names of the pool's workers the Prefect server sees as ONLINE."""
    workers = _prefect_post(api_url, f"/work_pools/{pool}/workers/filter", {}, auth_string)
    return [w["name"] for w in workers if w.get("status") == "ONLINE"]


def worker_healthy(service: Service, api_url: str, pool: str, auth_string: str | None = None) -> bool:
    """Whether the Prefect server sees the pool's worker ONLINE."""
    try:
        return worker_name(pool) in online_workers(api_url, pool, auth_string)
    except (OSError, ValueError):
        return False


def wait_worker(service: Service, api_url: str, pool: str, timeout: float, auth_string: str | None = None) -> None:
    wait_until(service, lambda: worker_healthy(service, api_url, pool, auth_string), timeout, "online")
