"""Prefect flows: new data in.

`ingest_flow` curates the rows of one manifest that the dataset does not hold yet into it (show1/data/ingest.py:
earlier clips untouched, new rows deduplicated against them, the data contracts checked before publication) and,
when it kept new clips, emits `show1.data.ingested` with the new data version and the rows kept and quarantined.
`watch_flow` does that for each manifest in a folder or at an fsspec URL (`s3://bucket/incoming`) that the dataset
has not ingested yet (known by content hash), so a scheduled run with nothing new does nothing: the `ingest-watch`
deployment in prefect.yaml.

Runs with no server configured (Prefect's ephemeral API; then no event is sent). `python -m flows.ingest --help`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from flows.curate import curate_chunk
from flows.retry import retry_if
from show1 import events
from show1.config import DEFAULT_PARAMS, apply_environment_defaults, load_params
from show1.data import curate as curation
from show1.data.ingest import IngestReport, ingest, pending_manifests


@task(name="list-new-manifests", cache_policy=NO_CACHE)
def new_manifests(location: str, data: str) -> list[str]:
    return pending_manifests(location, data)


@task(name="emit-ingested-event", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if(lambda exc: isinstance(exc, (events.EventNotSent, OSError))))
def announce(report: IngestReport) -> str | None:
    """Send show1.data.ingested to the Prefect server (the flow run attached); None with no server configured."""
    if events.server() is None:
        print("no event: no Prefect server configured (PREFECT_API_URL); the data is ingested")
        return None
    event_id = events.send(**report.event())
    print(f"event {report.event()['event']} sent (id {event_id})")
    return event_id


@flow(name="show1-ingest", log_prints=True)
def ingest_flow(manifest: str, data: str | None = None, params_path: str = str(DEFAULT_PARAMS),
                profile: str | None = None, emit: bool = True) -> dict[str, Any]:
    """Ingest the new rows of `manifest` (a path or an fsspec URL) into `data` (default: paths.curated)."""
    apply_environment_defaults()
    params = load_params(params_path, profile)
    data = data or str(params.paths.curated)

    def run_chunks(plan: curation.CurationPlan, indices: list[int], again: bool) -> list[curation.ChunkReport]:
        return [f.result() for f in curate_chunk.map([plan.job(i) for i in indices], force=unmapped(again))]

    report = ingest(manifest, data, params, run_chunks=run_chunks)
    print(f"{manifest}: {report.rows} rows, {report.already_held} already held, {report.new_rows} new: "
          f"{report.kept} kept ({report.new_clips} clips), {report.quarantined} quarantined "
          f"{report.quarantined_by_reason}; data version {report.data_version}")
    result: dict[str, Any] = report.to_dict() | {"event": None}
    if report.nothing_kept:
        print(f"no event: {report.nothing_kept}")
    elif emit:
        result["event"] = announce(report)
    return result


@flow(name="show1-ingest-watch", log_prints=True)
def watch_flow(location: str, data: str | None = None, params_path: str = str(DEFAULT_PARAMS),
               profile: str | None = None, emit: bool = True) -> list[dict[str, Any]]:
    """Ingest each manifest (*.csv, *.tsv, *.jsonl) in `location` (a folder or an fsspec URL such as
    s3://bucket/incoming) that `data` (default: paths.curated) has not ingested yet, in name order."""
    apply_environment_defaults()
    data = data or str(load_params(params_path, profile).paths.curated)
    manifests = new_manifests(location, data)
    if not manifests:
        print(f"nothing to ingest: {data} has ingested every manifest in {location}")
    return [ingest_flow(manifest, data, params_path, profile, emit) for manifest in manifests]


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.ingest MANIFEST` or `python -m flows.ingest --watch LOCATION`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m flows.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", nargs="?", help="one manifest to ingest (a path or an fsspec URL)")
    parser.add_argument("--watch", metavar="LOCATION", help="ingest every new manifest in this folder or URL")
    parser.add_argument("--data", help="default: paths.curated in params.yaml")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--profile", choices=["tiny", "paper"])
    parser.add_argument("--no-event", action="store_true", help="emit no show1.data.ingested event")
    args = parser.parse_args(argv)
    if bool(args.manifest) == bool(args.watch):
        parser.error("give a MANIFEST or --watch LOCATION")
    if args.watch:
        result: Any = watch_flow(args.watch, args.data, args.params, args.profile, not args.no_event)
    else:
        result = ingest_flow(args.manifest, args.data, args.params, args.profile, not args.no_event)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
