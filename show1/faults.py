"""Named fault points, for crash testing with real processes and real signals.

Code that must survive a kill -9 at a precise moment (between writing a checkpoint and publishing it, between
creating a logged model and registering a version, …) marks that moment with `fault_point("name")`. It does
nothing unless the environment says `SHOW1_FAULT=name` (or `name@N`: the N-th time the point is reached):
then the process sends itself SIGKILL there, exactly as an OOM killer or a lost node would stop it
(`SHOW1_FAULT_ONCE=PATH`: only the first of many processes that inherit the setting). The
reliability tests run show1 commands in subprocesses with each point set, then rerun them and check that
nothing is lost, duplicated or half-written.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

from show1.config import fault_injection, fault_once_marker

POINTS = (
    "curate.chunk.after_shard",        # a chunk's shard is written, its part file (the commit) is not
    "curate.before_finalize",          # every chunk is committed, index/quarantine/summary are not written
    "curate.publish.before_commit",    # the new index/quarantine/summary are staged, not committed
    "curate.publish.after_commit",     # committed, none moved into place yet
    "train.checkpoint.before_seal",    # a checkpoint's files are in the staging folder, unsealed
    "train.checkpoint.before_publish",  # sealed, not yet renamed into place
    "register.after_logged_model",     # a logged model exists (PENDING), nothing uploaded
    "register.after_upload",           # artifacts uploaded and finalized, no model version yet
    "register.after_version",          # the version exists, the alias does not point at it yet
    "train.data_cache.mid_download",   # a block of a shard is in the data cache's temporary, the rest is not
)
_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """SIGKILL this process here when SHOW1_FAULT names this point (and this is its N-th passage)."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r} (known: {', '.join(POINTS)})")
    spec = fault_injection()
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] < int(nth or 1):
        return
    marker = fault_once_marker()
    if marker is not None:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process has died here already
    os.kill(os.getpid(), signal.SIGKILL)
