"""The application servers of the local stack: the MLflow tracking server (PostgreSQL + S3 artifacts), the Prefect
server (PostgreSQL) and one Prefect process worker per work pool of `prefect.yaml` (`cpu`, `gpu`)."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from show1.stack import postgres
from show1.stack.processes import Service, http_ok, start, wait_until

WORK_POOLS = ("cpu", "gpu")  # the pools prefect.yaml deploys to
ARTIFACTS_PREFIX = "mlflow"  # s3://BUCKET/mlflow: the tracking server's artifact store
PREFECT = [sys.executable, "-m", "prefect"]


def local_url(host: str, port: int) -> str:
    """The URL this machine's clients use (a server bound to every interface is reached on 127.0.0.1)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def start_mlflow(host: str, port: int, pg_port: int, bucket: str, workers: int, env: Mapping[str, str],
                 log: Path) -> Service:
    """`mlflow server` with its runs, registry and aliases in PostgreSQL and its artifacts in s3://bucket/mlflow,
    served through the server (clients need no S3 credentials: `mlflow-artifacts:/` URIs)."""
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres.url(pg_port, "mlflow", "psycopg"),
            "--artifacts-destination", f"s3://{bucket}/{ARTIFACTS_PREFIX}", "--host", host, "--port", str(port),
            "--workers", str(workers)]
    # MLflow's job runner (GenAI scorers, prompt optimisation, trace roll-ups: nothing show1 uses) would start 8
    # huey consumer processes beside the server, ~250 MB each; a user who wants it sets the variable to true.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}
    return start("mlflow", argv, log=log, url=local_url(host, port), env=env)


def mlflow_healthy(service: Service) -> bool:
    return http_ok(f"{service.url}/health")


def wait_mlflow(service: Service, timeout: float) -> None:
    wait_until(service, lambda: mlflow_healthy(service), timeout, "healthy")


def start_prefect(host: str, port: int, pg_port: int, home: Path, env: Mapping[str, str], log: Path) -> Service:
    """`prefect server start` on PostgreSQL (its own database; the UI on the same port)."""
    server_env = {**env, "PREFECT_HOME": str(home),
                  "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url(pg_port, "prefect", "asyncpg")}
    server_env.pop("PREFECT_API_URL", None)
    argv = [*PREFECT, "server", "start", "--host", host, "--port", str(port)]
    return start("prefect", argv, log=log, url=local_url(host, port), env=server_env)


def prefect_healthy(service: Service) -> bool:
    return http_ok(f"{service.url}/api/health")


def wait_prefect(service: Service, timeout: float) -> None:
    wait_until(service, lambda: prefect_healthy(service), timeout, "healthy")


def worker_name(pool: str) -> str:
    return f"show1-{pool}"


def start_worker(pool: str, api_url: str, project: Path, env: Mapping[str, str], log: Path) -> Service:
    """A process worker polling `pool`; it creates the pool when missing. Flow runs start in `project`
    (SHOW1_HOME, which prefect.yaml's pull step changes into) with the stack's settings."""
    worker_env = {**env, "PREFECT_API_URL": api_url, "SHOW1_HOME": str(project)}
    argv = [*PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--name", worker_name(pool),
            "--install-policy", "never"]
    return start(f"worker-{pool}", argv, log=log, url=f"{api_url}/work_pools/{pool}", env=worker_env, cwd=project)


def online_workers(api_url: str, pool: str) -> list[str]:
    """Names of the pool's workers the Prefect server sees as ONLINE."""
    request = urllib.request.Request(f"{api_url}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return [w["name"] for w in json.loads(response.read()) if w.get("status") == "ONLINE"]


def worker_healthy(service: Service, api_url: str, pool: str) -> bool:
    """Whether the Prefect server sees the pool's worker ONLINE."""
    try:
        return worker_name(pool) in online_workers(api_url, pool)
    except (OSError, ValueError):
        return False


def wait_worker(service: Service, api_url: str, pool: str, timeout: float) -> None:
    wait_until(service, lambda: worker_healthy(service, api_url, pool), timeout, "online")
