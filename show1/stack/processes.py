"""Long-running service processes of the local stack: start detached with a log file, wait until healthy, stop.

A service outlives the command that started it (`show1 stack up` exits; the servers keep running), so it is
identified later by its pid *and* its start time: a pid the system has since given to another process is never
signalled. Each service runs in its own session (process group), so a stop reaches the workers it forked too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

STOP_GRACE_S = 30.0  # how long a service may take to stop on its stop signal before it is killed


class StackError(RuntimeError):
    """A service of the stack could not be started, reached or stopped; the message says which and why."""


class Service(BaseModel):
    """A started service, as the stack's state file records it."""

    name: str
    pid: int
    started: float  # the process's start time (psutil's create_time), which tells it from a later owner of the pid
    url: str
    log: str
    stop_signal: int = int(signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start(name: str, argv: Sequence[str], *, log: Path, url: str, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, user: str | None = None, stop_signal: int = signal.SIGTERM) -> Service:
    """Start `argv` detached (its own session, stdin closed), its output appended to `log`."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        handle.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {' '.join(argv)}\n".encode())
        handle.flush()
        try:
            process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                       env=dict(env) if env is not None else None, cwd=cwd, user=user,
                                       start_new_session=True, close_fds=True, preexec_fn=_default_stop_signals)
        except OSError as exc:
            raise StackError(f"{name} could not be started ({argv[0]}): {exc}") from None
    try:
        started = psutil.Process(process.pid).create_time()
    except psutil.NoSuchProcess:
        started = 0.0
    return Service(name=name, pid=process.pid, started=started, url=url, log=str(log), stop_signal=int(stop_signal))


def _default_stop_signals() -> None:
    """In the service's process, before it execs: the default action for the signals that stop it. A command
    started under nohup, or in the background by a non-interactive shell (a CI step, a script's `&`), ignores SIGINT,
    and an ignored signal stays ignored across exec: a Prefect worker, which stops its inner process with SIGINT,
    then never stopped, and `stack down` waited out its grace and killed it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def is_running(service: Service) -> bool:
    """Whether the service's process is still the one that was started, and alive (a zombie is not)."""
    import psutil

    try:
        process = psutil.Process(service.pid)
        if service.started and abs(process.create_time() - service.started) > 1.0:
            return False  # the pid belongs to another process now
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def log_tail(service: Service, lines: int = 30) -> str:
    try:
        text = Path(service.log).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(service: Service, ready: Callable[[], bool], timeout: float, what: str = "ready") -> None:
    """Poll `ready()` until it is true; fail, with the end of the service's log, if the process ends first or
    `timeout` seconds pass (exceptions from `ready` count as not yet)."""
    deadline = time.monotonic() + timeout
    pause = 0.1
    while True:
        with contextlib.suppress(Exception):
            if ready():
                return
        if not is_running(service):
            _reap(service.pid)
            raise StackError(f"{service.name} exited before it was {what}; the end of {service.log}:\n"
                             f"{log_tail(service)}")
        if time.monotonic() > deadline:
            raise StackError(f"{service.name} was not {what} after {timeout:.0f} s (raise --timeout on a slow "
                             f"machine); the end of {service.log}:\n{log_tail(service)}")
        time.sleep(pause)
        pause = min(1.0, pause * 1.5)


def http_ok(url: str, timeout: float = 5.0) -> bool:
    """Whether GET `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop(service: Service, grace: float = STOP_GRACE_S) -> Literal["not running", "stopped", "killed"]:
    """Stop the service's process group: its stop signal, then SIGKILL after `grace` seconds. Returns how:
    "not running", "stopped" (it ended on its stop signal) or "killed"."""
    if not is_running(service):
        _reap(service.pid)
        return "not running"
    _signal_group(service.pid, service.stop_signal)
    deadline = time.monotonic() + grace
    while is_running(service) and time.monotonic() < deadline:
        _reap(service.pid)
        time.sleep(0.1)
    how: Literal["stopped", "killed"] = "stopped"
    if is_running(service):
        how = "killed"
        _signal_group(service.pid, signal.SIGKILL)
        while is_running(service):
            _reap(service.pid)
            time.sleep(0.05)
    _signal_group(service.pid, signal.SIGKILL)  # what the service forked and left behind in its group
    _reap(service.pid)
    # Return when the group is gone: a caller told "stopped" may reuse the port or the data folder at once.
    deadline = time.monotonic() + grace
    while group_alive(service.pid) and time.monotonic() < deadline:
        _reap(service.pid)
        time.sleep(0.05)
    return how


def group_alive(pid: int) -> bool:
    """Whether a live process of the group `pid` leads is still there (zombies, which a parent other than this
    process has yet to reap, count as gone)."""
    import psutil

    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)  # the service leads its own session: its group id is its pid


def _reap(pid: int) -> None:
    """Collect the exit status when the service is this process's own child (a stack started and stopped by one
    process, as in tests), so that it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One start or stop at a time of what runs from `folder` (a stack, `show1 ui`): an OS lock on `folder/.lock`,
    released if its holder is killed."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
