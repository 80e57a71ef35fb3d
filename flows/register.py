"""Prefect flows: register trained stages in the MLflow Model Registry, and promote challengers.

Registration is retried on transient store errors (a busy sqlite file, a tracking server that hiccups, an upload
that failed), never on bad input (a damaged checkpoint fails at once); it is idempotent by content hash, so a retry
never makes a second version. `python -m flows.register --help`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.retry import retry_if
from show1.config import DEFAULT_PARAMS, apply_environment_defaults, load_params
from show1.models.configs import STAGES


def _retryable(exc: BaseException) -> bool:
    from show1.registry.register import retryable

    return retryable(exc)


@task(name="register-stage", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if(_retryable),
      cache_policy=NO_CACHE)
def register_stage(stage: str, params_path: Path, profile: str | None, checkpoint: str | None) -> dict[str, Any]:
    from show1.registry.register import register_stage as register

    version = register(load_params(params_path, profile), stage, Path(checkpoint) if checkpoint else None)
    if version.note:
        print(f"{stage}: {version.note}")
    print(f"{stage}: {'registered' if version.created else 'already registered as'} {version.uri} (challenger)")
    return {"stage": stage, "model": version.name, "version": version.version, "created": version.created,
            "content_hash": version.content_hash}


@task(name="promote-stage", cache_policy=NO_CACHE)
def promote_stage(stage: str, params_path: Path, profile: str | None) -> dict[str, Any]:
    from show1.registry.promote import promote_stage as promote

    decision = promote(load_params(params_path, profile), stage)
    verdict = decision.verdict if decision.record_only else "promoted" if decision.promoted else "not promoted"
    print(f"{decision.name}: version {decision.challenger} {verdict}: {decision.reason}")
    return decision.to_dict()


def _stages(stages: list[str] | None) -> list[str]:
    stages = stages or list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}: the stages are {', '.join(STAGES)}")
    return stages


@flow(name="show1-register", log_prints=True)
def register_flow(stages: list[str] | None = None, params_path: str = str(DEFAULT_PARAMS),
                  profile: str | None = None, checkpoints: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Register each stage's trained folder (default: paths.runs/STAGE/final, or `checkpoints[stage]`) as
    `<prefix>-<stage>` and point `challenger` at it."""
    apply_environment_defaults()
    checkpoints = checkpoints or {}
    return [register_stage(stage, Path(params_path), profile, checkpoints.get(stage)) for stage in _stages(stages)]


@flow(name="show1-promote", log_prints=True)
def promote_flow(stages: list[str] | None = None, params_path: str = str(DEFAULT_PARAMS),
                 profile: str | None = None) -> list[dict[str, Any]]:
    """Promote each stage's challenger to champion where its evaluation passes the gate in params.yaml."""
    apply_environment_defaults()
    return [promote_stage(stage, Path(params_path), profile) for stage in _stages(stages)]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.register", description=register_flow.__doc__)
    parser.add_argument("--stages", nargs="+", choices=STAGES)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--profile", choices=["tiny", "paper"])
    parser.add_argument("--promote", action="store_true", help="Then promote the challengers that pass the gate.")
    args = parser.parse_args()
    register_flow(args.stages, args.params, args.profile)
    if args.promote:
        promote_flow(args.stages, args.params, args.profile)
