"""Prefect flow: generate a video per prompt with the registry's models, score them, report, and (optionally)
promote the challengers that pass the gate. Deployed nightly by prefect.yaml (`nightly-evaluate`);
`python -m flows.generate_evaluate --serve` runs the same schedule locally without a work pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from show1.config import DEFAULT_PARAMS, Params, apply_environment_defaults, load_params
from show1.registry.names import CHALLENGER

NIGHTLY = "0 3 * * *"  # 03:00 UTC
DEFAULT_ALIAS = CHALLENGER  # evaluation comes before promotion (show1.evaluation.run loads torch: tasks import it)


@task(name="find-finished-evaluation", cache_policy=NO_CACHE)
def find_finished(params: Params, prompts: str | None, alias: str, limit: int | None,
                  out: str | None) -> dict[str, Any] | None:
    """The evaluation in the output folder when it was made from exactly these versions, prompts and settings."""
    from show1.evaluation.prompts import load_prompt_set
    from show1.evaluation.reuse import finished_evaluation
    from show1.models.configs import STAGES
    from show1.registry.resolve import parse_refs, resolve

    cfg = params.evaluate
    prompt_set = load_prompt_set(prompts or cfg.prompts, limit or cfg.limit)
    versions = resolve(params, parse_refs(alias, tuple(s for s in STAGES if s in cfg.stages)))
    folder = Path(out or cfg.out)
    stored = finished_evaluation(params, prompt_set.prompts, versions, cfg.reference_split, folder)
    if stored is None:
        return None
    print(f"evaluation: unchanged inputs, reusing {folder} ({', '.join(stored['models'].values())})")
    return {"metrics": stored["metrics"], "skipped": stored["skipped"], "report": str(folder / "report.html"),
            "run_id": stored["run_id"], "models": stored["models"], "reused": True}


@task(name="load-cascade", cache_policy=NO_CACHE)
def prepare(params_path: Path, profile: str | None, prompts: str | None, alias: str, limit: int | None,
            out: str | None) -> Any:
    from show1.evaluation import run as evaluation

    plan = evaluation.prepare(load_params(params_path, profile), prompts, from_registry=alias, limit=limit,
                              out=Path(out) if out else None)
    print(f"evaluating {', '.join(plan.cascade.sources.values())} on {len(plan.prompts.prompts)} prompts "
          f"({plan.prompts.name})")
    return plan


@task(name="generate-video", cache_policy=NO_CACHE)
def generate(plan: Any, batch: Any) -> list[Any]:
    from show1.evaluation import run as evaluation

    videos = evaluation.generate_batch(plan, batch)
    for video in videos:
        print(f"video {video.index}: {video.prompt!r} in {video.seconds:.1f} s")
    return videos


@task(name="score-and-report", cache_policy=NO_CACHE)
def finish(plan: Any, videos: list[Any]) -> dict[str, Any]:
    from show1.evaluation import run as evaluation

    result = evaluation.finish(plan, videos, on_status=print)
    print(f"metrics {result.metrics}; report {result.report}; MLflow run {result.run_id}")
    return {"metrics": result.metrics, "skipped": result.skipped, "report": str(result.report),
            "run_id": result.run_id, "models": result.sources, "reused": False}


@flow(name="show1-generate-evaluate", log_prints=True)
def generate_evaluate_flow(prompts: str | None = None, alias: str = DEFAULT_ALIAS,
                           params_path: str = str(DEFAULT_PARAMS), profile: str | None = None,
                           limit: int | None = None, out: str | None = None, promote: bool = False,
                           reuse: bool = False) -> dict[str, Any]:
    """Generate for the prompt set (default: evaluate.prompts) with the registry's `alias` versions, score against
    the curated reference split, write the report, log to MLflow; with `promote`, then run the promotion gate.

    With `reuse`, an evaluation already in the output folder, made from the same versions, prompts, settings and
    reference data, is the result (what the whole-cascade flow does, like `dvc repro`)."""
    apply_environment_defaults()
    summary = find_finished(load_params(params_path, profile), prompts, alias, limit, out) if reuse else None
    if summary is None:
        summary = _evaluate(Path(params_path), profile, prompts, alias, limit, out)
    if promote:
        from flows.register import promote_flow

        summary["promotion"] = promote_flow(list(summary["models"]), params_path, profile)
    return summary


def _evaluate(params_path: Path, profile: str | None, prompts: str | None, alias: str, limit: int | None,
              out: str | None) -> dict[str, Any]:
    from show1.evaluation import run as evaluation

    plan = prepare(params_path, profile, prompts, alias, limit, out)
    try:
        videos = [video for batch in evaluation.batches(plan) for video in generate(plan, batch)]
    except BaseException:
        evaluation.discard(plan)
        raise
    return finish(plan, videos)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.generate_evaluate",
                                     description=generate_evaluate_flow.__doc__)
    parser.add_argument("--prompts")
    parser.add_argument("--alias", default=DEFAULT_ALIAS)
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
