"""Services the product starts (show1.stack), started alone for tests that need only one of them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from show1.stack import object_store
from show1.stack.processes import free_port, stop


@contextlib.contextmanager
def s3_store(folder: Path) -> Iterator[str]:
    """The stack's S3 server (moto) with its bucket, logging into `folder`; yields its endpoint URL."""
    import s3fs

    # s3fs keeps one filesystem per set of arguments, with the endpoint it found in the environment then: a test
    # module's server must not be reached through the previous module's (stopped) one.
    s3fs.S3FileSystem.clear_instance_cache()
    service = object_store.start_server("127.0.0.1", free_port(), folder / "s3.log")
    try:
        object_store.wait_ready(service, timeout=300)
        object_store.ensure_bucket(service.url)
        yield service.url
    finally:
        stop(service)
        s3fs.S3FileSystem.clear_instance_cache()


def api(base: str, path: str, body: dict | None = None) -> dict | list:
    """GET (no body) or POST (a JSON body) a JSON API such as Prefect's REST API: the decoded answer."""
    request = urllib.request.Request(f"{base}{path}", data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def stop_group(process: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 30) -> None:
    """Stop a process started with start_new_session=True, and its group: `first`, then SIGKILL after `grace` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def served(argv: list[str], env: Mapping[str, str], log: Path, health: str, what: str,
           timeout: float = 180) -> Iterator[None]:
    """Run a server (`argv`, output to `log`) until the block ends; enter the block once GET `health` answers."""
    with open(log, "w") as out:
        server = subprocess.Popen(argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(health, timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{what} did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def prefect_server(folder: Path, env: Mapping[str, str], port: int | None = None) -> Iterator[str]:
    """`prefect server start` on a free port with `env` (its PREFECT_HOME among it), logging into `folder`; yields
    its API URL."""
    port = port or free_port()
    argv = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
            str(port)]
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    base = f"http://127.0.0.1:{port}/api"
    with served(argv, server_env, folder / "prefect-server.log", f"{base}/health", "prefect server"):
        yield base


@contextlib.contextmanager
def mlflow_server(folder: Path, store: str, artifacts: Path) -> Iterator[str]:
    """`mlflow server` on the store `store` (without MLflow's job runner), logging into `folder`; yields its URL."""
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--default-artifact-root",
            str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # No job runner: its ~7 consumer processes (GenAI jobs) cost ~25 CPU-s to start and show1 has no jobs.
    env = os.environ | {"MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    base = f"http://127.0.0.1:{port}"
    with served(argv, env, folder / "mlflow-server.log", f"{base}/health", "mlflow server", timeout=120):
        yield base
