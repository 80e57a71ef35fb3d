"""Where curation's chunks run: threads of this process (`local`) or the worker processes of a Dask cluster.

A chunk is the unit of work and of commit (see `show1.data.curate`): a worker decodes its rows, writes its shard
atomically and then its part file. Dask reschedules the chunks of a worker that dies (a SIGKILL, a lost node) on
the others; the rerun of a chunk rewrites its shard from scratch, and a half-written one never has the shard's
name (the temporary file it was is removed when curation finalizes). The outputs are the local executor's,
byte for byte: near-duplicate search and the index are built afterwards, in manifest order, from the part files.

No address: a LocalCluster of `workers` processes is started for the run and stopped after it. An address
(`tcp://HOST:PORT`): that cluster's workers, which must reach the same output folder and see the same files.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from show1.config import Executor
from show1.dask_cluster import dask_client
from show1.data.curate import ChunkReport, ChunkRunner, CurationPlan, run_chunk


def run_on_dask(client: Any, plan: CurationPlan, indices: list[int], force: bool,
                on_row: Callable[[], None] | None = None) -> list[ChunkReport]:
    """Run the chunks as Dask tasks, one per chunk, each sent only its own rows (`CurationPlan.job`). No retry of a
    chunk that fails (that is a bug: bad data is quarantined, not raised); a lost worker's chunks are rescheduled
    by Dask itself. Reports come back in chunk order."""
    from distributed import as_completed

    if not indices:
        return []
    run = uuid.uuid4().hex[:8]
    futures = client.map(run_chunk, [plan.job(index) for index in indices], force=force, pure=False,
                         key=[f"curate-chunk-{index:05d}-{run}" for index in indices])
    reports = []
    try:
        for future in as_completed(futures):
            report = future.result()
            reports.append(report)
            for _ in plan.chunk(report.index):
                on_row and on_row()
    finally:
        client.cancel(futures)
    return sorted(reports, key=lambda r: r.index)


@contextlib.contextmanager
def chunk_runner(executor: Executor, on_row: Callable[[], None] | None = None) -> Iterator[ChunkRunner | None]:
    """The `run_chunks` that `curate()` takes for this executor: None for `local` (curate's own threads), a Dask
    runner (its cluster up for the duration) for `dask`."""
    if executor.kind == "local":
        yield None
        return
    with dask_client(executor, "curate.executor.address") as client:
        yield lambda plan, indices, force: run_on_dask(client, plan, indices, force, on_row)
