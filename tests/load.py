"""A saturated machine, for tests that show1 still works on one: busy-loop processes, 2 per core.

The load can be confined to some of the cores (CPU affinity): the processes under test and the busy loops then see a
saturated machine of that many cores, and the rest of the test session keeps the other cores. Affinity is inherited:
whatever a pinned process starts (a Prefect server, a flow's subprocesses) is pinned too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

# Each loop ends on its own after this long, even if the test that started it is killed and never cleans up.
LOOP_LIMIT_S = 900


def available_cores() -> set[int]:
    """The cores this process may run on (what os.process_cpu_count counts on Python 3.13)."""
    return os.sched_getaffinity(0)


def one_core() -> set[int]:
    """One core of the available ones: the last (the first tends to take the machine's interrupts)."""
    return {max(available_cores())}


def on_cores(cores: set[int], command: Sequence[str]) -> list[str]:
    """`command`, run with its affinity set to `cores` (it execs: same process, pinned from its first instruction)."""
    launcher = ("import os, sys\nos.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')})\n"
                "os.execvp(sys.argv[2], sys.argv[2:])\n")
    return [sys.executable, "-c", launcher, ",".join(map(str, sorted(cores))), *command]


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(parents.get(current, []))
    return found


def pin_process_tree(pid: int, cores: set[int]) -> None:
    """Move a running process, every thread of it and every process below it onto `cores`."""
    for process in _descendants(pid):
        for task in Path(f"/proc/{process}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):  # a thread or process that just ended
                os.sched_setaffinity(int(task.name), cores)


@contextlib.contextmanager
def busy_cores(cores: set[int] | None = None, per_core: int = 2, limit_s: float = LOOP_LIMIT_S) -> Iterator[int]:
    """Keep `per_core` processes per core spinning on `cores` (default: every available core) for the body of the
    `with`; yields their number."""
    cores = cores or available_cores()
    loop = f"import time\nend = time.monotonic() + {limit_s}\nwhile time.monotonic() < end:\n    pass\n"
    spinners = [subprocess.Popen(on_cores(cores, [sys.executable, "-c", loop])) for _ in range(per_core * len(cores))]
    try:
        yield len(spinners)
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
