"""The whole cascade as one Prefect flow: curate → validate → train the four stages → register → generate and
evaluate → promote, each step a subflow of the flows beside this file.

`show1 run` and `make demo` run it (tiny profile: the demo clips, minutes on a CPU). With no Prefect server it
runs on the ephemeral API; with `prefect server start` every subflow and task shows in the UI. Re-running it
re-does only what changed: curation skips unchanged chunks, training reuses a finished run with the same
params and data, registration returns the existing version of the same content, and an evaluation of the same
versions, prompts and settings is reused (`show1 evaluate` always evaluates again, with the same numbers). A
finished training tracked in another MLflow store than this run's is logged into this one first (flows/train.py).

Run from the command line, a failure ends in one `error:` line; Prefect's tracebacks go to a file that line names
(`--verbose` shows them instead), and stay whole in a Prefect server's run logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.curate import curate_flow
from flows.generate_evaluate import generate_evaluate_flow
from flows.register import promote_flow, register_flow
from flows.train import train_flow
from show1.config import DEFAULT_PARAMS, apply_environment_defaults, load_params, prefect_api_url, show1_command
from show1.flow_failures import FlowFailed, run_flow
from show1.inputs import printable
from show1.models.configs import STAGES
from show1.preflight import check_run_inputs
from show1.run_lock import RunLockedError, project_run_lock
from show1.store import ui_command


@flow(name="show1-cascade", log_prints=True)
def cascade_flow(params_path: str = str(DEFAULT_PARAMS), profile: str | None = None, manifest: str | None = None,
                 prompts: str | None = None, limit: int | None = None, promote: bool = True) -> dict[str, Any]:
    """Run the lifecycle end to end with the settings of params.yaml (and `profile`). Its inputs are checked first
    (`show1.preflight`): a missing manifest or prompt file stops it before curation."""
    apply_environment_defaults()
    params = load_params(params_path, profile)
    check_run_inputs(params, manifest, prompts, limit)
    curated = curate_flow(manifest, str(params.paths.curated), params_path, profile)
    trained = train_flow(list(STAGES), str(params.paths.curated), str(params.paths.runs), params_path, profile,
                         reuse=True)
    registered = register_flow(list(STAGES), params_path, profile)
    evaluation = generate_evaluate_flow(prompts, "challenger", params_path, profile, limit, reuse=True)
    promotion = promote_flow(list(STAGES), params_path, profile) if promote else []
    out = Path(evaluation["report"]).parent
    return {"curation": curated["summary"], "training": trained, "registered": registered, "evaluation": evaluation,
            "promotion": promotion, "video": str(out / "videos" / "000.mp4"), "report": evaluation["report"],
            "mlflow_ui": ui_command(params.tracking), "prefect_ui": prefect_ui()}


def prefect_ui() -> str:
    """Where this run's flow runs can be browsed: the server's UI, or (they went to a temporary server) the command
    that serves one that the next runs started here report to."""
    api = prefect_api_url()
    if api:
        return f"open {api.removesuffix('/').removesuffix('/api')} (the Prefect server's UI)"
    return f"{show1_command()} ui  (then the runs started in this folder show in its Prefect UI)"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What a person wants after a run: where the video and the report are, and how to browse the rest."""
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result["evaluation"]["metrics"].items())
    promoted = [p["model"] for p in result["promotion"] if p["promoted"]]
    registered = ", ".join(f"{r['model']}/{r['version']}" for r in result["registered"])
    return [
        f"video:          {result['video']}",
        f"report:         {result['report']}",
        f"metrics:        {metrics}",
        f"registered:     {registered} (challenger)",
        f"promoted:       {', '.join(promoted) or 'none (see show1 promote --dry-run)'}",
        f"lineage:        show1 lineage {result['video']}",
        f"MLflow UI:      {result['mlflow_ui']}",
        f"Prefect UI:     {result['prefect_ui']}",
    ]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.cascade", description=cascade_flow.__doc__)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--profile", choices=["tiny", "paper"])
    parser.add_argument("--manifest")
    parser.add_argument("--prompts")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--no-promote", action="store_true")
    parser.add_argument("--no-wait", action="store_true",
                        help="refuse at once, instead of waiting, when another run holds this folder's lock")
    parser.add_argument("--verbose", action="store_true",
                        help="show the tracebacks of a failure here (default: in a file the error line names)")
    args = parser.parse_args()
    try:
        check_run_inputs(load_params(args.params, args.profile), args.manifest, args.prompts, args.limit)
    except ValueError as exc:  # an InputError, a ConfigError
        parser.exit(2, f"error: {printable(str(exc))}\n")
    try:
        with project_run_lock(Path.cwd(), wait=not args.no_wait, on_wait=print):
            outcome = run_flow(cascade_flow, args.params, args.profile, args.manifest, args.prompts, args.limit,
                               not args.no_promote, verbose=args.verbose)
    except (RunLockedError, FlowFailed) as exc:
        parser.exit(1, f"error: {printable(str(exc))}\n")
    print("\n" + "\n".join(summary_lines(outcome)))
