"""Running a flow's mapped tasks on a Dask cluster through prefect-dask's DaskTaskRunner: the runner for an
`Executor` of kind `dask`, and the Prefect API its worker processes report to. Used by the curation flow (chunks)
and the evaluation flow (videos)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from show1.config import Executor


@contextlib.contextmanager
def api_for_workers() -> Iterator[None]:
    """Point the Dask worker processes at this flow's Prefect API. With no server configured, the flow runs on a
    temporary local server that only this process knows; each worker would start one of its own (seconds of CPU,
    and the task runs would be recorded there, out of the flow's sight). Workers on other machines cannot
    reach that local server: with an executor's address, set PREFECT_API_URL to a Prefect server they reach."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url).rstrip("/")
    os.environ["PREFECT_API_URL"] = url  # the worker processes are started with this process's environment
    try:
        with temporary_settings({PREFECT_API_URL: url}):  # and the flow's settings travel with each task
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def dask_task_runner(executor: Executor) -> Any:
    from prefect_dask import DaskTaskRunner

    if executor.address:
        return DaskTaskRunner(address=executor.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": executor.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None,
                                          "silence_logs": logging.ERROR})
