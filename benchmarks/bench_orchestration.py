"""Orchestration overhead: the whole-cascade Prefect flow against calling the same show1 functions directly,
in the same run, on the same settings (goal: the flow takes at most 15% longer).

    python benchmarks/bench_orchestration.py [--full-tiny] [--repeat 1]

Each side runs in a fresh project folder with its own MLflow store: curate → validate → train the four stages →
register → generate and evaluate → promote. By default on quarter-size clips with a few steps per stage (a
couple of minutes); `--full-tiny` uses params.yaml's tiny profile as `make demo` does. With `--repeat N` the
two sides alternate N times and the medians are compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("base", "interp", "sr1", "sr2")
SMALL = {
    "paths": {"manifest": str(ROOT / "data/manifests/demo.csv")},
    "curate": {"clip": {"sizes": [[32, 20], [128, 80]], "stride": 8}},
    "train": {"max_steps": 3, "checkpoint_every": 3, "sample_every": 0},
    "evaluate": {"stages": ["base", "interp"], "steps": 2, "frames_per_video": 4, "max_reference_clips": 4},
}


def project(base: Path, name: str, full_tiny: bool) -> Path:
    folder = base / name
    folder.mkdir()
    if full_tiny:
        doc = yaml.safe_load((ROOT / "params.yaml").read_text())
        doc["paths"]["manifest"] = str(ROOT / doc["paths"]["manifest"])
    else:
        doc = SMALL
    (folder / "params.yaml").write_text(yaml.safe_dump(doc))
    return folder


def in_project(folder: Path) -> None:
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def direct(folder: Path) -> float:
    """The same steps as flows/cascade.py, as plain function calls."""
    from show1.config import load_params
    from show1.data.contracts import validate_data
    from show1.data.curate import curate
    from show1.evaluation.run import evaluate
    from show1.registry.promote import promote_stage
    from show1.registry.register import register_stage
    from show1.training.trainer import train

    in_project(folder)
    started = time.perf_counter()
    params = load_params("params.yaml")
    curate(params.paths.manifest, params.paths.curated, params)
    validate_data(params.paths.curated, params, params.paths.validation, manifest=params.paths.manifest)
    for stage in STAGES:
        train(stage, params.paths.curated, params.paths.runs / stage, params)
    for stage in STAGES:
        register_stage(params, stage)
    evaluate(params, limit=1)
    for stage in STAGES:
        promote_stage(params, stage)
    return time.perf_counter() - started


def orchestrated(folder: Path) -> float:
    from flows.cascade import cascade_flow

    in_project(folder)
    started = time.perf_counter()
    cascade_flow("params.yaml", limit=1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-tiny", action="store_true", help="params.yaml's tiny profile (as make demo)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    import flows.cascade  # noqa: F401  imports (torch, Prefect, MLflow) are paid before either side is timed

    here = os.getcwd()
    times: dict[str, list[float]] = {"direct": [], "flow": []}
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        for round_ in range(args.repeat):
            for side, run in (("direct", direct), ("flow", orchestrated)):
                seconds = run(project(Path(tmp), f"{side}-{round_}", args.full_tiny))
                times[side].append(seconds)
                print(f"round {round_ + 1}: {side:>6} {seconds:7.1f} s", flush=True)
        os.chdir(here)
    direct_s, flow_s = statistics.median(times["direct"]), statistics.median(times["flow"])
    overhead = flow_s / direct_s - 1
    print(f"\ndirect calls {direct_s:.1f} s, Prefect flow {flow_s:.1f} s: overhead {overhead:+.1%} "
          f"(goal <= +15%: {'met' if overhead <= 0.15 else 'NOT met'})")


if __name__ == "__main__":
    main()
