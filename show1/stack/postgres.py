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
reach it, nothing else does. A stack with credentials (show1/stack/credentials.py) requires a password there too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

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


def start_server(data: Path, port: int, log: Path, passfile: Path | None = None) -> Service:
    """Start `postgres` on 127.0.0.1:`port` (TCP only). SIGINT is its fast shutdown: clients are disconnected.
    `passfile`: the stack's pgpass file, which its health checks connect with when the stack has credentials."""
    argv = [str(binaries() / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=", "-c", "max_connections=200"]
    return start("postgres", argv, log=log, url=url(port, passfile=passfile), user=run_as(),
                 stop_signal=signal.SIGINT)


def url(port: int, database: str = "postgres", driver: str = "", passfile: Path | None = None,
        password: str | None = None) -> str:
    """The superuser's URL of `database`; with a `passfile` (libpq's, which psycopg and pg_dump read) or a `password`
    (in the URL: only for a process's environment, never its command line) when the stack has credentials."""
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    user = f"{SUPERUSER}:{quote(password, safe='')}" if password else SUPERUSER
    query = f"?passfile={quote(str(passfile))}" if passfile else ""
    return f"{scheme}://{user}@127.0.0.1:{port}/{database}{query}"


# With credentials on: every connection needs the password, and only 127.0.0.1 may connect (the server listens there
# alone too); initdb's `trust` lines are gone.
PASSWORD_HBA = ("# show1 stack with credentials: password authentication (scram-sha-256), loopback only\n"
                "host all all 127.0.0.1/32 scram-sha-256\n")


def require_password(service: Service, data: Path, port: int, password: str, passfile: Path) -> None:
    """Give the superuser `password` and make the server require it (pg_hba.conf, then a reload). Run while the server
    still trusts loopback (a new cluster) or with the password it already requires (`passfile`)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url(port, passfile=passfile), autocommit=True, connect_timeout=30) as connection:
        connection.execute("SET password_encryption = 'scram-sha-256'")
        connection.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(SUPERUSER),
                                                                      sql.Literal(password)))
    hba = data / "pg_hba.conf"
    if hba.read_text(encoding="utf-8") != PASSWORD_HBA:
        stat_info = hba.stat()
        hba.write_text(PASSWORD_HBA, encoding="utf-8")
        if os.geteuid() == 0:  # PostgreSQL's own user must still read it
            os.chown(hba, stat_info.st_uid, stat_info.st_gid)
        os.kill(service.pid, signal.SIGHUP)  # the postmaster rereads pg_hba.conf
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and accepts_without_password(port):
            time.sleep(0.2)


def requires_password(data: Path) -> bool:
    """Whether the cluster in `data` was set to require the stack's password (a stack with credentials made it)."""
    try:
        return (data / "pg_hba.conf").read_text(encoding="utf-8") == PASSWORD_HBA
    except OSError:
        return False


def accepts_without_password(port: int) -> bool:
    """Whether the server lets the superuser in with no password."""
    import psycopg

    try:
        # A missing password file: libpq then sends no password (a user's ~/.pgpass would send one).
        with psycopg.connect(url(port), connect_timeout=5, passfile="/nonexistent/show1-no-pgpass"):
            return True
    except psycopg.OperationalError:
        return False


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


def tool(name: str) -> Path:
    """A client program (`pg_dump`, `pg_restore`) of the same PostgreSQL as the server: a dump's format is the
    server's version's."""
    path = binaries() / name
    if not os.access(path, os.X_OK):
        raise StackError(f"{path} is missing: backups need PostgreSQL's client programs beside the server's")
    return path


def dump(port: int, database: str, target: Path, passfile: Path | None = None) -> None:
    """`pg_dump` of `database` in the custom format (compressed, read by `pg_restore`): one consistent snapshot,
    taken while the servers that use it run."""
    done = subprocess.run([str(tool("pg_dump")), "--format=custom", "--file", str(target), "--dbname",
                           url(port, database, passfile=passfile)], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise StackError(f"pg_dump of the {database} database failed:\n{done.stderr[-3000:]}")


def restore(port: int, database: str, source: Path, passfile: Path | None = None) -> None:
    """Replace the objects of `database` with those of a `dump`, in one transaction: a failure leaves the database as
    it was. Objects are owned by the superuser who restores them, whoever owned them where the dump was taken."""
    done = subprocess.run([str(tool("pg_restore")), "--clean", "--if-exists", "--single-transaction", "--no-owner",
                           "--no-privileges", "--dbname", url(port, database, passfile=passfile), str(source)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise StackError(f"pg_restore of {source} into the {database} database failed (it is unchanged):\n"
                         f"{done.stderr[-3000:]}")


def check_dump(source: Path) -> None:
    """Refuse a dump that this `pg_restore` cannot read (another format, a newer PostgreSQL's), before a restore
    replaces anything."""
    done = subprocess.run([str(tool("pg_restore")), "--list", str(source)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise StackError(f"{source} is not a dump this PostgreSQL ({binaries()}) can restore: "
                         f"{done.stderr.strip()[-1000:]}")


def server_version(port: int, passfile: Path | None = None) -> str:
    import psycopg

    with psycopg.connect(url(port, passfile=passfile), connect_timeout=30) as connection:
        return str(connection.execute("SHOW server_version").fetchone()[0])


def create_databases(port: int, names: tuple[str, ...] = DATABASES, passfile: Path | None = None) -> None:
    """Create each database that does not exist yet."""
    import psycopg

    with psycopg.connect(url(port, passfile=passfile), autocommit=True, connect_timeout=30) as connection:
        existing = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in existing:
                connection.execute(f'CREATE DATABASE "{name}"')
