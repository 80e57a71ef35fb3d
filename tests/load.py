"""A saturated machine, for tests that show1 still works on one: busy-loop processes, 2 per core."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

# Each loop ends on its own after this long, even if the test that started it is killed and never cleans up.
LOOP_LIMIT_S = 900


@contextlib.contextmanager
def busy_cores(per_core: int = 2, limit_s: float = LOOP_LIMIT_S) -> Iterator[int]:
    """Keep `per_core` × the core count of processes spinning for the body of the `with`; yields their number."""
    count = per_core * (os.cpu_count() or 1)
    loop = f"import time\nend = time.monotonic() + {limit_s}\nwhile time.monotonic() < end:\n    pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(count)]
    try:
        yield count
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
