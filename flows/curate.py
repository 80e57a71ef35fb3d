"""Prefect flow: curate a manifest (chunks mapped as tasks, retried on IO errors), validate, then embed the captions
once (`show1 embed`: what training reads instead of loading the text encoder).

`curate.executor` says where the chunk tasks run: on this flow's threads (`local`), or through prefect-dask's
DaskTaskRunner (`dask`) on the worker processes of a LocalCluster started for the run, or of the running
cluster at `curate.executor.address`.

Runs with no server configured (Prefect's ephemeral API). `python -m flows.curate --help`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from flows.dask_runner import api_for_workers, dask_task_runner
from flows.retry import io_error, retry_if
from show1.config import DEFAULT_PARAMS, apply_environment_defaults, load_params
from show1.data import curate as curation


@task(name="curate-chunk", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_if(io_error),
      cache_policy=NO_CACHE)
def curate_chunk(job: curation.ChunkJob, force: bool = False) -> curation.ChunkReport:
    return curation.run_chunk(job, force=force)


@task(name="validate-contracts", cache_policy=NO_CACHE)
def validate(curated: Path | str, params_path: Path, profile: str | None, manifest: Path) -> dict[str, Any]:
    from show1.data.contracts import validate_data

    params = load_params(params_path, profile)
    report = validate_data(curated, params, params.paths.validation, manifest=manifest)
    if not report.success:
        raise ValueError("data contract broken:\n  " + "\n  ".join(report.failed_expectations()))
    return {"success": report.success, "result": str(report.result_path), "docs": str(report.docs_path)}


@task(name="embed-captions", cache_policy=NO_CACHE)
def embed(curated: Path | str) -> dict[str, Any]:
    from show1.training.embed import embed_folder

    report = embed_folder(curated)  # the encoder training uses by default; a rerun embeds only new captions
    print(f"captions: {report.added} embedded, {report.stored} stored in {report.store}")
    return {"store": str(report.store), "encoder_key": report.encoder_key, "added": report.added}


@flow(name="show1-curate", log_prints=True)
def curate_flow(manifest: str | None = None, out: str | None = None, params_path: str = str(DEFAULT_PARAMS),
                profile: str | None = None, run_validation: bool = True, force: bool = False,
                embed_captions: bool = True) -> dict[str, Any]:
    """Curate `manifest` into `out` (defaults from params.yaml), check the data contracts, embed the captions."""
    apply_environment_defaults()
    params = load_params(params_path, profile)
    manifest_path = Path(manifest) if manifest else params.paths.manifest
    out_path = out or params.paths.curated  # a folder or an fsspec URL (s3://bucket/prefix)
    executor = params.curate.executor

    def run_chunks(plan: curation.CurationPlan, indices: list[int], again: bool) -> list[curation.ChunkReport]:
        jobs = [plan.job(i) for i in indices]  # each task is sent its own chunk's rows, not the whole manifest
        if executor.kind == "dask":  # the chunk tasks of this flow run, on a Dask cluster's worker processes
            with api_for_workers(), dask_task_runner(executor) as runner:
                return [f.result() for f in runner.map(curate_chunk, {"job": jobs, "force": unmapped(again)})]
        return [f.result() for f in curate_chunk.map(jobs, force=unmapped(again))]

    summary = curation.curate(manifest_path, out_path, params, force=force, run_chunks=run_chunks).to_dict()
    print(f"kept {summary['kept_sources']} of {summary['rows']} rows: {summary['clips']} clips "
          f"(rejected: {summary['rejected_by_reason']})")
    result: dict[str, Any] = {"summary": summary}
    if run_validation:
        result["validation"] = validate(out_path, Path(params_path), profile, manifest_path)
    if embed_captions and "://" in str(out_path):
        print(f"captions not embedded: show1 embed reads local folders only for now ({out_path}); training embeds "
              "them when it starts")
    elif embed_captions:
        result["embeddings"] = embed(out_path)
    return result


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.curate`: run the flow and say where everything went (what `make demo` runs)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m flows.curate", description=curate_flow.__doc__)
    parser.add_argument("manifest", nargs="?", help="default: paths.manifest in params.yaml")
    parser.add_argument("--out", help="default: paths.curated in params.yaml")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--profile", choices=["tiny", "paper"])
    parser.add_argument("--no-validate", action="store_true", help="skip the data contracts")
    parser.add_argument("--no-embed", action="store_true", help="leave the captions to be embedded at train start")
    args = parser.parse_args(argv)
    result = curate_flow(args.manifest, args.out, args.params, args.profile, not args.no_validate,
                         embed_captions=not args.no_embed)
    summary = result["summary"]
    print("\ncuration summary:\n" + json.dumps(summary, indent=2))
    print(f"\ncurated clips: {summary['out']}/index.jsonl (shards in {summary['out']}/shards)")
    print(f"quarantine:    {summary['out']}/quarantine.jsonl")
    if "validation" in result:
        print(f"contracts:     {result['validation']['result']}")
        print(f"data docs:     {result['validation']['docs']}")
    if "embeddings" in result:
        print(f"embeddings:    {result['embeddings']['store']}")


if __name__ == "__main__":
    main()
