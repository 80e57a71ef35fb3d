"""The stack's credentials: on whenever it listens beyond loopback, a setting (off by default) on 127.0.0.1 alone.

Generated at the first `show1 stack up` that needs them into `credentials` in the stack folder (JSON, mode 0600) and
reused by every later `up`: once a stack folder has credentials they stay on. What each service requires:
- MLflow: its basic-auth app (`mlflow server --app-name basic-auth`); users in the `mlflow_auth` database, an
  `admin` account and a `show1` account for people and runners (MLFLOW_TRACKING_USERNAME/PASSWORD);
- Prefect: the server's API auth string (PREFECT_SERVER_API_AUTH_STRING; clients PREFECT_API_AUTH_STRING);
- PostgreSQL: a password (scram-sha-256) for 127.0.0.1 only; the servers read it from a pgpass file or their
  environment, so it shows in no process's command line;
- the object store: moto's server cannot sanely enforce access keys (its auth is moto's in-memory IAM, whose keys
  it generates itself and forgets at every restart), so with credentials on it listens on 127.0.0.1 only and other
  machines reach artifacts through MLflow's proxy (README: "A team's stack").
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import BaseModel

from show1.stack.processes import StackError

FILE = "credentials"
PGPASS = "pgpass"
MLFLOW_AUTH_INI = "mlflow-auth.ini"
AUTH_DATABASE = "mlflow_auth"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MLFLOW_ADMIN = "admin"
MLFLOW_USER = "show1"  # the account runners and people use
# Every signed-in user may do everything show1's runners do on every experiment and model, including deleting the
# model versions of a lost registration race (MANAGE); the admin account only adds and removes users.
MLFLOW_DEFAULT_PERMISSION = "MANAGE"


def loopback_only(host: str) -> bool:
    """Whether a server on `host` is reachable from this machine's own 127.0.0.1 alone (127.0.0.2 is not: another
    address, which other users' clients or a test can bind)."""
    return host in LOOPBACK


class Credentials(BaseModel):
    """The stack's secrets: `credentials` in the stack folder."""

    mlflow_admin_password: str
    mlflow_password: str
    mlflow_secret_key: str  # signs the basic-auth app's CSRF tokens: the same in every worker of the server
    prefect_auth_string: str
    postgres_password: str

    def client_env(self) -> dict[str, str]:
        """What MLflow and Prefect clients (and the stack's workers) need."""
        return {"MLFLOW_TRACKING_USERNAME": MLFLOW_USER, "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
                "PREFECT_API_AUTH_STRING": self.prefect_auth_string}


def path(folder: Path) -> Path:
    return Path(folder) / FILE


def read(folder: Path) -> Credentials | None:
    file = path(folder)
    if not file.is_file():
        return None
    try:
        return Credentials.model_validate_json(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StackError(f"{file} is not a credentials file ({str(exc).splitlines()[0]}): move it aside") from None


def _write_private(file: Path, text: str) -> None:
    """Write `text` to `file`, readable by this user only from the start (never briefly world-readable)."""
    staging = file.with_name(f".{file.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(staging, file)


def ensure(folder: Path) -> Credentials:
    """The stack's credentials, generated now when it has none."""
    existing = read(folder)
    if existing is not None:
        return existing
    made = Credentials(mlflow_admin_password=secrets.token_urlsafe(24), mlflow_password=secrets.token_urlsafe(24),
                       mlflow_secret_key=secrets.token_urlsafe(32), prefect_auth_string=secrets.token_urlsafe(32),
                       postgres_password=secrets.token_urlsafe(24))
    _write_private(path(folder), made.model_dump_json(indent=2) + "\n")
    return made


def write_pgpass(folder: Path, creds: Credentials, user: str) -> Path:
    """libpq's password file for the stack's PostgreSQL (mode 0600, which libpq insists on)."""
    file = Path(folder) / PGPASS
    _write_private(file, f"127.0.0.1:*:*:{user}:{creds.postgres_password}\n")
    return file


def write_mlflow_auth_config(folder: Path, creds: Credentials, database_url: str) -> Path:
    """The basic-auth app's ini (MLFLOW_AUTH_CONFIG_PATH): its users in `database_url`, the admin's password."""
    file = Path(folder) / MLFLOW_AUTH_INI
    _write_private(file, "[mlflow]\n"
                         f"default_permission = {MLFLOW_DEFAULT_PERMISSION}\n"
                         f"database_uri = {database_url}\n"
                         f"admin_username = {MLFLOW_ADMIN}\n"
                         f"admin_password = {creds.mlflow_admin_password}\n"
                         "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return file


def check_installed() -> None:
    """MLflow's basic-auth app needs the `auth` extra (Flask-WTF): say so before anything starts."""
    import importlib.util

    if importlib.util.find_spec("flask_wtf") is None:
        raise StackError("a stack with credentials runs MLflow's basic-auth app, which is not installed: "
                         "pip install 'show1[stack]' (mlflow[auth])")


def basic_auth(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def prefect_headers(auth_string: str | None) -> dict[str, str]:
    """The header a Prefect server with an API auth string requires (Prefect's client sends the same)."""
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()} if auth_string else {}


def ensure_mlflow_user(url: str, creds: Credentials) -> None:
    """Create the `show1` account with the admin's (nothing when it exists)."""
    body = json.dumps({"username": MLFLOW_USER, "password": creds.mlflow_password}).encode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/users/create", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": basic_auth(MLFLOW_ADMIN, creds.mlflow_admin_password)})
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as exc:
        answer = exc.read().decode(errors="replace")
        if "RESOURCE_ALREADY_EXISTS" in answer or "already exists" in answer:
            return
        raise StackError(f"MLflow refused to create its {MLFLOW_USER!r} user ({exc.code}): {answer[:500]}") from None
