"""Running `show1` in real subprocesses, and killing them: at a named fault point or at a random moment."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import warm

REPO = Path(__file__).resolve().parents[2]
ROUNDS = int(os.environ.get("SHOW1_SOAK_ROUNDS", "1"))  # make test: one random kill each; soak runs set more
SEED = int(os.environ.get("SHOW1_SOAK_SEED", "8"))

# The training crash tests' params: the demo clips at a quarter of the tiny profile's sizes, a base step well under
# a second.
TRAINING_SMALL = {
    "curate": {"clip": {"sizes": [[32, 20], [128, 80]], "stride": 8}},
    "train": {"learning_rate": 0.001, "batch_size": 2, "sample_every": 0, "keep_last": 3},
}


def show1(params: Path, *args: str, fault: str | None = None, env: dict[str, str] | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    environment.pop("SHOW1_FAULT", None)
    if fault:
        environment["SHOW1_FAULT"] = fault
    return warm.run([sys.executable, "-m", "show1.cli", "--params", str(params), *args], cwd=REPO,
                          capture_output=True, text=True, env=environment, timeout=timeout)


def killed_at_random(argv: list[str], rng: random.Random, ready: str | None, window_s: float,
                     env: dict[str, str] | None = None) -> int | None:
    """Start `argv`; once it prints `ready` on stderr or stdout (None: at once), SIGKILL it after a random pause in
    [0, window_s).
    Returns None when it was killed, 0 when it finished first; a process that failed before its kill fails the
    test with its output (it would otherwise pass for one that was killed too late to matter)."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    environment.pop("SHOW1_FAULT", None)
    process = warm.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment)
    output: list[str] = []
    started = threading.Event()

    def read() -> None:  # all along: a full pipe would stop the process before its kill
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if ready is not None and ready in line:
                started.set()
        started.set()  # the output ended: the process is gone

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if ready is not None:
            started.wait()
        time.sleep(rng.uniform(0, window_s))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return None
        process.wait()
        reader.join()
        assert process.returncode == 0, (f"{' '.join(argv[:6])} exited with {process.returncode} before its kill:\n"
                                         f"{''.join(output)[-4000:]}")
        return 0
    finally:
        process.kill()
        process.wait()
        reader.join(timeout=30)


