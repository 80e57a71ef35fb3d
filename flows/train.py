"""Prefect flow: train one stage (or several in order) of the cascade.

In-process by default; with `processes` > 1 it runs under torchrun in that many data-parallel processes, and with
`accelerate_config` (a file from `accelerate config`) under `accelerate launch` (DDP on the GPUs that file
names). Deployed on the `gpu` work pool by prefect.yaml, whose job variables set both.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from show1 import atomic
from show1.config import (
    DEFAULT_PARAMS,
    Params,
    accelerate_config_file,
    apply_environment_defaults,
    load_params,
    train_node_variables,
    train_processes,
)
from show1.training.launch import Nodes, launch_command, nodes_from
from show1.training.runs import TRAINABLE_STAGES, TrainResult, finished_run
from show1.training.tracking import NotInStore, run_in_store


@task(name="train-stage", cache_policy=NO_CACHE)
def train_stage(stage: str, data: Path, run_dir: Path, params_path: Path, profile: str | None,
                max_steps: int | None, resume: str | None, accelerate_config: str | None,
                reuse: bool = False, processes: int = 1, init_from: str | None = None) -> dict[str, Any]:
    params = load_params(params_path, profile)
    target = run_dir
    if reuse and resume is None:
        done = finished_run(stage, data, run_dir, params, max_steps)
        why = f"inputs changed since {run_dir} was trained"
        if done is not None:  # same params, data and steps: the finished run is the result (as DVC would skip it)
            try:  # its training tracked in this store (registration links the version to it)
                tracked = run_in_store(params, run_dir)
            except NotInStore as exc:
                why = str(exc)
            else:
                if tracked is not None and (note := tracked.note(run_dir)):  # logged into this store just now
                    print(f"{stage}: {note}")
                print(f"{stage}: unchanged inputs, reusing the finished run {run_dir}")
                return {"stage": stage, "final": str(done.final), "reused": True, **done.summary()}
        if run_dir.exists():
            # Trained beside the finished run, which it replaces only once it has finished: a failed or killed
            # training leaves the previous run (and its final/ stage folder) as it was.
            target = run_dir.parent / f".{run_dir.name}.next"
            print(f"{stage}: {why}: training again in {target}; it replaces {run_dir} when it finishes")
            shutil.rmtree(target, ignore_errors=True)  # what a killed retraining left: started again
    result = _train(stage, data, target, params_path, params, profile, max_steps, resume, accelerate_config,
                    processes, init_from)
    if not result.main_process:  # another node of a multi-node run: node 0 reports the run and replaces the folder
        return {"stage": stage, "final": str(run_dir / "final"), "reused": False, "main_node": False}
    if target != run_dir:
        atomic.replace_folder(target, run_dir)
        result = TrainResult(run_dir=run_dir, steps=result.steps, final=run_dir / "final", losses=result.losses)
    summary = result.summary()
    print(f"{stage}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, stage folder {result.final}")
    return {"stage": stage, "final": str(result.final), "reused": False, **summary}


def _train(stage: str, data: Path, run_dir: Path, params_path: Path, params: Params, profile: str | None,
           max_steps: int | None, resume: str | None, accelerate_config: str | None, processes: int,
           init_from: str | None = None) -> TrainResult:
    """Train `stage` into `run_dir`: here, or in `processes` processes under torchrun / accelerate launch;
    `init_from` (a stage folder or `models:/show1-base@champion`) fine-tunes it."""
    nodes = nodes_from(train_node_variables())
    if accelerate_config or processes > 1 or nodes.count > 1:
        launch = launcher(processes, accelerate_config, nodes)
        command = [*launch, "-m", "show1.cli", "--params", str(params_path),
                   *(["--profile", profile] if profile else []), "train", "--stage", stage, "--data", str(data),
                   "--out", str(run_dir), "--quiet"]
        command += ["--max-steps", str(max_steps)] if max_steps else []
        command += ["--resume", resume] if resume else []
        command += ["--init-from", init_from] if init_from else []
        print(f"{stage}: training under {' '.join(launch[1:])}")
        subprocess.run(command, check=True)  # torchrun returns once every node's processes have ended
        if not nodes.is_host:  # the run folder (shared storage) is node 0's to report and replace
            print(f"{stage}: trained as a node of {nodes.count} (this node {nodes.address}); node 0, the rendezvous "
                  f"host {nodes.host}, holds the run {run_dir} and reports it")
            return TrainResult(run_dir=run_dir, steps=-1, final=run_dir / "final", losses=[], main_process=False,
                               processes=processes * nodes.count)
        done = finished_run(stage, data, run_dir, params, max_steps)
        steps = done.steps if done is not None else -1
        result = TrainResult(run_dir=run_dir, steps=steps, final=run_dir / "final", losses=[])
    else:
        from show1.training.trainer import train  # torch and diffusers: only when something is trained here

        result = train(stage, data, run_dir, params, max_steps=max_steps, resume=resume, init_from=init_from,
                       on_step=_progress(stage))
    return result


def launcher(processes: int, accelerate_config: str | None, nodes: Nodes | None = None) -> list[str]:
    """The command that starts the training processes (show1.training.launch): `accelerate launch` with the config,
    else torchrun with `processes` on this machine, or on each of `nodes` (the SHOW1_TRAIN_NODES job variables)."""
    return launch_command(processes, accelerate_config, nodes)


def _progress(stage: str, every: int = 10) -> Any:
    def report(row: dict[str, Any]) -> None:
        if row["step"] == 1 or row["step"] % every == 0:
            print(f"{stage}: step {row['step']} loss {row['loss']:.4f} ({row['samples_per_s']:.2f} samples/s)")

    return report


@flow(name="show1-train", log_prints=True)
def train_flow(stages: list[str] | None = None, data: str | None = None, runs: str | None = None,
               params_path: str = str(DEFAULT_PARAMS), profile: str | None = None, max_steps: int | None = None,
               resume: str | None = None, accelerate_config: str | None = None,
               reuse: bool = False, processes: int | None = None,
               register_trained: bool = False) -> list[dict[str, Any]]:
    """Train `stages` (default: every trainable stage) on the curated data, one after another.

    With `register_trained`, each trained stage is then registered (`show1-STAGE`, alias challenger) by this same
    flow run: what a runner on another machine than the stack does (prefect.yaml's `train` deployment), since its run
    folders are on its own disk, where the `register` deployment on the stack's `cpu` worker cannot read them.

    With `reuse`, a stage whose finished run has the same params, data and steps is not trained again, and a
    run folder trained from other inputs is replaced (what the whole-cascade flow does, like `dvc repro`).

    `accelerate_config` (or the SHOW1_ACCELERATE_CONFIG job variable of the deployment) runs the training
    under `accelerate launch` with that config. `processes` (or the SHOW1_TRAIN_PROCESSES job variable) trains
    each stage in that many data-parallel processes on the worker: torchrun, or `accelerate launch
    --num_processes` with a config; `train.batch_size` stays the global batch."""
    apply_environment_defaults()
    accelerate_config = accelerate_config or accelerate_config_file()
    processes = processes or train_processes()
    params = load_params(params_path, profile)
    stages = stages or list(TRAINABLE_STAGES)
    unknown = [s for s in stages if s not in TRAINABLE_STAGES]
    if unknown:
        raise ValueError(f"cannot train {unknown}: trainable stages are {', '.join(TRAINABLE_STAGES)}")
    data_dir = Path(data) if data else params.paths.curated
    runs_dir = Path(runs) if runs else params.paths.runs
    results = [train_stage(stage, data_dir, runs_dir / stage, Path(params_path), profile, max_steps, resume,
                           accelerate_config, reuse, processes) for stage in stages]
    if register_trained:
        from flows.register import register_stage

        for result in results:
            if result.get("main_node") is False:  # another node of a multi-node run: node 0 registers it
                continue
            result["registered"] = register_stage(result["stage"], Path(params_path), profile, result["final"])
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.train", description=train_flow.__doc__)
    parser.add_argument("--stages", nargs="+", choices=TRAINABLE_STAGES)
    parser.add_argument("--data")
    parser.add_argument("--runs")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--profile", choices=["tiny", "paper"])
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--resume", choices=["latest"])
    parser.add_argument("--accelerate-config")
    parser.add_argument("--processes", type=int, help="Data-parallel processes per stage (default: "
                        "SHOW1_TRAIN_PROCESSES, else 1: in this process).")
    parser.add_argument("--register", action="store_true", help="Register each trained stage (alias challenger).")
    args = parser.parse_args()
    train_flow(args.stages, args.data, args.runs, args.params, args.profile, args.max_steps, args.resume,
               args.accelerate_config, processes=args.processes, register_trained=args.register)
