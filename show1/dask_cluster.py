"""A Dask client for an `Executor` of kind `dask`: of the running cluster at its address, or of a LocalCluster of
its `workers` single-threaded worker processes, started for the duration and stopped after it.

What runs there (curation's chunks, evaluation's videos) is in `show1.data.executors` and
`show1.evaluation.fanout`; the workers must see the same files as this process (one machine, or a shared file
system).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from show1.config import Executor

CONNECT_TIMEOUT_S = 30


class ClusterUnavailable(RuntimeError):
    """The Dask scheduler at the configured address could not be reached."""


@contextlib.contextmanager
def dask_client(executor: Executor, setting: str = "executor.address") -> Iterator[Any]:
    """A `distributed.Client` of the cluster at `executor.address` (`setting` names where that address was set, for
    the error), or of a new LocalCluster of `executor.workers` single-threaded worker processes (closed on exit)."""
    from distributed import Client, LocalCluster

    if executor.address:
        try:
            client = Client(executor.address, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise ClusterUnavailable(f"no Dask scheduler answered at {executor.address} ({setting}) "
                                     f"within {CONNECT_TIMEOUT_S} s: {exc}") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=executor.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client
