"""Prefect flow: the continuous-training loop's second half. New data came in (`show1 ingest` emitted
`show1.data.ingested`); fine-tune each stage from its champion, register the results as challengers, evaluate the
challenger cascade and the champion cascade on the same prompts and seeds, and promote through the gate.

prefect.yaml's `refresh` deployment runs it from an event trigger on `show1.data.ingested` (no polling loop): one
flow run per ingest, named `refresh-<data version>`, one at a time (a concurrency limit of 1: a second ingest's run
waits in the queue). A refresh that fails before the gate leaves the champion where it was; the gate's decision,
either way, is recorded on each challenger version (`promotion.*` tags) and as a markdown artifact on the flow run
(challenger vs champion, metric by metric).

`python -m flows.refresh --data-version V` runs it here (the stage list defaults to evaluate.stages: a stage the
evaluation does not generate with could never pass the gate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.generate_evaluate import generate_evaluate_flow
from flows.register import promote_flow, register_stage
from flows.train import train_stage
from show1.config import (
    DEFAULT_PARAMS,
    accelerate_config_file,
    apply_environment_defaults,
    load_params,
    train_processes,
)
from show1.models.configs import STAGES
from show1.provenance import data_version as current_data_version
from show1.registry import refresh as plan
from show1.registry.names import CHAMPION

ARTIFACT_KEY = "show1-refresh"


def run_name() -> str:
    """`refresh-<data version, 12 characters>`: which ingest a flow run answers, at a glance in the Prefect UI."""
    from prefect.runtime import flow_run

    return f"refresh-{plan.short_version(str(flow_run.parameters.get('data_version', '')))}"


@task(name="find-champions", cache_policy=NO_CACHE)
def find_champions(params_path: Path, profile: str | None, stages: list[str]) -> dict[str, plan.StartingPoint]:
    found = plan.champions(load_params(params_path, profile), stages)
    for point in found.values():
        print(f"{point.stage}: fine-tuning from the champion {point.name}/{point.version}")
    return found


@task(name="compare-and-report", cache_policy=NO_CACHE)
def report(params_path: Path, profile: str | None, data_version: str, decisions: list[dict[str, Any]]) -> str:
    params = load_params(params_path, profile)
    rows = plan.compare(params, decisions)
    table = plan.markdown(data_version, rows, [rule.metric for rule in params.registry.gate])
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=table,
                             description=f"challenger vs champion for data version {data_version}")
    return table


@flow(name="show1-refresh", flow_run_name=run_name, log_prints=True)
def refresh_flow(data_version: str, data: str | None = None, stages: list[str] | None = None,
                 params_path: str = str(DEFAULT_PARAMS), profile: str | None = None, prompts: str | None = None,
                 limit: int | None = None) -> dict[str, Any]:
    """Fine-tune `stages` (default: evaluate.stages) from their champions on the curated data `data` (default
    paths.curated) at `data_version`, register them as challengers, evaluate challengers and champions on the same
    prompts and seeds, and promote the challengers that pass registry.gate."""
    apply_environment_defaults()
    params = load_params(params_path, profile)
    stages = list(stages or params.evaluate.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"cannot refresh {unknown}: the stages are {', '.join(STAGES)}")
    data = data or str(params.paths.curated)
    now = current_data_version(data)
    if now != data_version:
        print(f"the data is at version {now} now, past {data_version} (a later ingest): fine-tuning on it")
    starts = find_champions(Path(params_path), profile, stages)
    runs = plan.run_folder(params, data_version)
    accelerate_config, processes = accelerate_config_file(), train_processes()
    registered = []
    for stage in stages:
        steps = params.train_for(stage).fine_tuning().max_steps
        # resume=latest: a retried flow run continues its trainings (from step 0 when none was started)
        trained = train_stage(stage, data, runs / stage, Path(params_path), profile, steps, "latest",
                              accelerate_config, processes=processes, init_from=starts[stage].uri)
        registered.append(register_stage(stage, Path(params_path), profile, trained["final"]))
    champion = generate_evaluate_flow(prompts, CHAMPION, params_path, profile, limit,
                                      str(plan.evaluation_folder(params, data_version, CHAMPION)), reuse=True)
    challenger = generate_evaluate_flow(prompts, plan.challenger_reference(stages), params_path, profile, limit,
                                        str(plan.evaluation_folder(params, data_version, "challenger")))
    decisions = promote_flow(stages, params_path, profile)
    table = report(Path(params_path), profile, data_version, decisions)
    print(table)
    return {"data_version": data_version, "trained_on": now, "started_from": {s: p.uri for s, p in starts.items()},
            "registered": registered, "champion_evaluation": champion, "challenger_evaluation": challenger,
            "promotion": decisions}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.refresh", description=refresh_flow.__doc__)
    parser.add_argument("--data-version", help="default: the curated data's version now")
    parser.add_argument("--data")
    parser.add_argument("--stages", nargs="+", choices=STAGES)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--profile", choices=["tiny", "paper"])
    parser.add_argument("--prompts")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    data = args.data or load_params(args.params, args.profile).paths.curated
    version = args.data_version or current_data_version(data)
    refresh_flow(version, args.data, args.stages, args.params, args.profile, args.prompts, args.limit)
