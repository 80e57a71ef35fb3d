"""PostgreSQL for the local stack: the database behind the MLflow tracking server and the Prefect server.

It is the system's PostgreSQL (Debian's `postgresql` package: `make stack` installs it when root with apt), run by
show1 itself with `initdb` and `postgres` on a data folder of the stack: no system service, no cluster of the
distribution's, nothing outside the stack's folder. Found, in order: `SHOW1_POSTGRES_BIN` (a `bin/` folder),
`/usr/lib/postgresql/<newest>/bin` (Debian, Ubuntu), `/usr/pgsql-<newest>/bin` (RHEL), `postgres` on PATH
(Homebrew). A self-contained PostgreSQL wheel (`pgserver`) was tried first: its build has no contrib extensions,
and the Prefect server's PostgreSQL schema needs `pg_trgm` ("extension "pg_trgm" is not available").

PostgreSQL refuses to run as root. Started by root (CI containers), it runs as an unprivileged user
(`SHOW1_POSTGRES_USER`; default `postgres`, which the Debian package creates, else `nobody`), who owns the data
folder and must be able to reach it. It listens on 127.0.0.1 only, with `trust` authentication: the stack's servers
reach it, nothing else does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from show1.stack.processes import Service, StackError, start, wait_until

DATABASES = ("mlflow", "prefect")
SUPERUSER = "postgres"


def _candidates() -> list[Path]:
    override = os.environ.get("SHOW1_POSTGRES_BIN")
    if override:
        return [Path(override)]

    def newest(pattern: str) -> list[Path]:
        found = [p for p in Path("/").glob(pattern) if re.search(r"\d", p.name)]
        return sorted(found, key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)], reverse=True)

    folders = [p / "bin" for p in newest("usr/lib/postgresql/*")] + [p / "bin" for p in newest("usr/pgsql-*")]
    on_path = shutil.which("postgres")
    if on_path:
        folders.append(Path(on_path).resolve().parent)
    return folders


def binaries() -> Path:
    """The folder with `initdb` and `postgres`."""
    candidates = _candidates()
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return folder
    if os.environ.get("SHOW1_POSTGRES_BIN"):
        raise StackError(f"SHOW1_POSTGRES_BIN={candidates[0]} has no executable initdb and postgres")
    raise StackError("PostgreSQL is not installed: `make stack` installs Debian's package when root with apt "
                     "(apt-get install postgresql); elsewhere install PostgreSQL 14 or newer with its contrib "
                     "extensions and set SHOW1_POSTGRES_BIN to its bin/ folder")


def run_as() -> str | None:
    """The user PostgreSQL runs as: None (this user), or an unprivileged one when this process is root."""
    if os.geteuid() != 0:
        return None
    user = os.environ.get("SHOW1_POSTGRES_USER")
    if user:
        return user
    import pwd

    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        return "nobody"


def _check_reachable(path: Path, user: str, what: str) -> None:
    """`user` (not the owner of anything here) must traverse every folder above `path`."""
    for folder in [*reversed(path.resolve().parents)]:
        if not folder.stat().st_mode & stat.S_IXOTH:
            raise StackError(f"PostgreSQL runs as {user!r} (it refuses root), who cannot reach {what} {path}: "
                             f"{folder} is not traversable by others. chmod o+x {folder}, or keep the stack under "
                             f"a folder others can traverse (--dir)")


def init(data: Path) -> None:
    """Create the database cluster in `data` (empty or absent) unless it exists."""
    if (data / "PG_VERSION").is_file():
        return
    bin_dir, user = binaries(), run_as()
    if data.exists() and any(data.iterdir()):
        raise StackError(f"{data} is not a PostgreSQL data folder and not empty: move it aside")
    staging = data.with_name(data.name + ".init")
    shutil.rmtree(staging, ignore_errors=True)  # a cluster half-made by a killed `stack up`
    staging.mkdir(parents=True)
    staging.chmod(0o700)
    if user is not None:
        _check_reachable(staging, user, "the data folder")
        _check_reachable(bin_dir / "postgres", user, "the binaries")
        shutil.chown(staging, user=user)
    done = subprocess.run([str(bin_dir / "initdb"), "-D", str(staging), "-U", SUPERUSER, "--auth=trust",
                           "--encoding=UTF8", "--no-instructions"], user=user, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise StackError(f"initdb failed for {data}:\n{(done.stdout + done.stderr)[-3000:]}")
    if data.exists():
        data.rmdir()
    staging.rename(data)


def start_server(data: Path, port: int, log: Path) -> Service:
    """Start `postgres` on 127.0.0.1:`port` (TCP only). SIGINT is its fast shutdown: clients are disconnected."""
    argv = [str(binaries() / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=", "-c", "max_connections=200"]
    return start("postgres", argv, log=log, url=url(port), user=run_as(), stop_signal=signal.SIGINT)


def url(port: int, database: str = "postgres", driver: str = "") -> str:
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://{SUPERUSER}@127.0.0.1:{port}/{database}"


def healthy(service: Service) -> bool:
    """Whether the server accepts a connection and answers a query."""
    import psycopg

    try:
        with psycopg.connect(service.url, connect_timeout=5) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def wait_ready(service: Service, timeout: float) -> None:
    wait_until(service, lambda: healthy(service), timeout, "accepting connections")


def create_databases(port: int, names: tuple[str, ...] = DATABASES) -> None:
    """Create each database that does not exist yet."""
    import psycopg

    with psycopg.connect(url(port), autocommit=True, connect_timeout=30) as connection:
        existing = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in existing:
                connection.execute(f'CREATE DATABASE "{name}"')
