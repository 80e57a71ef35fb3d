"""Prefect flow: generate a video per prompt with the registry's models, score them, report, and (optionally)
promote the challengers that pass the gate. Deployed nightly by prefect.yaml (`nightly-evaluate`);
`python -m flows.generate_evaluate --serve` runs the same schedule locally without a work pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from show1.config import DEFAULT_PARAMS, apply_environment_defaults, load_params
from show1.evaluation import run as evaluation

NIGHTLY = "0 3 * * *"  # 03:00 UTC


@task(name="load-cascade", cache_policy=NO_CACHE)
def prepare(params_path: Path, profile: str | None, prompts: str | None, alias: str, limit: int | None,
            out: str | None) -> evaluation.EvaluationPlan:
    plan = evaluation.prepare(load_params(params_path, profile), prompts, from_registry=alias, limit=limit,
                              out=Path(out) if out else None)
    print(f"evaluating {', '.join(plan.cascade.sources.values())} on {len(plan.prompts.prompts)} prompts "
          f"({plan.prompts.name})")
    return plan


@task(name="generate-video", cache_policy=NO_CACHE)
def generate(plan: evaluation.EvaluationPlan, index: int) -> evaluation.GeneratedVideo:
    video = evaluation.generate_one(plan, index)
    print(f"video {index}: {video.prompt!r} in {video.seconds:.1f} s")
    return video


@task(name="score-and-report", cache_policy=NO_CACHE)
def finish(plan: evaluation.EvaluationPlan, videos: list[evaluation.GeneratedVideo]) -> dict[str, Any]:
    result = evaluation.finish(plan, videos, on_status=print)
    print(f"metrics {result.metrics}; report {result.report}; MLflow run {result.run_id}")
    return {"metrics": result.metrics, "skipped": result.skipped, "report": str(result.report),
            "run_id": result.run_id, "models": result.sources}


@flow(name="show1-generate-evaluate", log_prints=True)
def generate_evaluate_flow(prompts: str | None = None, alias: str = evaluation.DEFAULT_ALIAS,
                           params_path: str = str(DEFAULT_PARAMS), profile: str | None = None,
                           limit: int | None = None, out: str | None = None, promote: bool = False) -> dict[str, Any]:
    """Generate for the prompt set (default: evaluate.prompts) with the registry's `alias` versions, score against
    the curated reference split, write the report, log to MLflow; with `promote`, then run the promotion gate."""
    apply_environment_defaults()
    plan = prepare(Path(params_path), profile, prompts, alias, limit, out)
    try:
        videos = [generate(plan, index) for index in range(len(plan.prompts.prompts))]
    except BaseException:
        evaluation.discard(plan)
        raise
    summary = finish(plan, videos)
    if promote:
        from flows.register import promote_flow

        summary["promotion"] = promote_flow(list(plan.cascade.sources), params_path, profile)
    return summary


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.generate_evaluate",
                                     description=generate_evaluate_flow.__doc__)
    parser.add_argument("--prompts")
    parser.add_argument("--alias", default=evaluation.DEFAULT_ALIAS)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--profile", choices=["tiny", "paper"])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out")
    parser.add_argument("--promote", action="store_true")
    parser.add_argument("--serve", action="store_true",
                        help=f"Serve the flow on the nightly schedule ({NIGHTLY} UTC) instead of running it now.")
    args = parser.parse_args()
    parameters = {"prompts": args.prompts, "alias": args.alias, "params_path": args.params, "profile": args.profile,
                  "limit": args.limit, "out": args.out, "promote": args.promote}
    if args.serve:
        generate_evaluate_flow.serve(name="nightly-evaluate-local", cron=NIGHTLY, parameters=parameters)
    else:
        generate_evaluate_flow(**parameters)
