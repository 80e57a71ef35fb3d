"""One whole-lifecycle run per project folder at a time.

Two `show1 run` in one folder would curate into the same shards, train into the same run folders and replace the
same `eval/` at once. The run takes an exclusive lock on a file in the project (an OS file lock: the kernel
releases it when the holder exits, kill -9 included, so a crashed run never leaves a stale lock). A second run
either waits for it, saying which lock and who holds it, or refuses at once with the same information.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".show1-run.lock"


class RunLockedError(RuntimeError):
    """Another run holds the project's lock and the caller chose not to wait."""


def lock_path(project: Path | str) -> Path:
    """The lock file of the project folder `project`."""
    return Path(project) / LOCK_NAME


def describe_holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it (pid, host, since when, command), or 'another process'."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process"
    return (f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('since', '?')} "
            f"({holder.get('command', '?')})")


@contextlib.contextmanager
def project_run_lock(project: Path | str, wait: bool = True, poll_s: float = 0.5,
                     on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the project's run lock for the body of the `with`.

    With `wait`, block until the holder finishes (calling `on_wait` once with a message naming the lock and its
    holder); without, raise `RunLockedError` with that message at once.
    """
    path = lock_path(project)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_CREAT without O_TRUNC: opening must never erase the holder's note before we hold the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                message = f"another show1 run holds the lock {path}: {describe_holder(path)}"
                if not wait:
                    raise RunLockedError(f"{message}. Let it finish, or run again without --no-wait to wait for it.") \
                        from None
                if not announced and on_wait is not None:
                    on_wait(f"{message}; waiting for it to finish")
                announced = True
                time.sleep(poll_s)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # the file stays (removing it would race with a waiter); the note goes
    finally:
        os.close(fd)  # closing releases the lock
