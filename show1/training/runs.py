"""A training run folder, read without torch: its files, its newest checkpoint, and whether a finished run was
trained from exactly the inputs asked for (what an orchestrator checks before training again)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from show1 import atomic
from show1.config import Params
from show1.models.configs import STAGES
from show1.models.text_layout import tiny_text_encoder_dir
from show1.provenance import data_version, params_hash

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TRAINABLE_STAGES = STAGES  # every stage: show1.training.specs has a batch builder for each


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final: Path
    losses: list[float]  # of the steps run in this call (a resumed run: only the new ones)
    main_process: bool = True  # False in the other processes of a data-parallel run (they wrote nothing)
    processes: int = 1
    sharding: str | None = None  # None (every process held the whole UNet), "accelerate" or "show1" (FSDP)
    parameters_held: float = 1.0  # the fraction of the UNet's parameters the main process held

    def summary(self) -> dict[str, Any]:
        """Small numbers for a metrics file, from the whole run's metrics.jsonl."""
        losses = [row["loss"] for row in atomic.read_jsonl(self.run_dir / METRICS)]
        return {"steps": self.steps, "final_loss": losses[-1] if losses else None,
                "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a step folder exists only once it is complete: it is renamed into place)."""
    steps = sorted((run_dir / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return steps[-1] if steps else None


def fingerprint(stage: str, params: Params, data_dir: Path, max_steps: int, text_encoder_dir: Path) -> dict[str, Any]:
    """What a finished run was trained from: the same fingerprint, the same run (on the same machine)."""
    return {"stage": stage, "params_hash": params_hash(params, stage), "data_version": data_version(data_dir),
            "max_steps": max_steps, "text_encoder": str(Path(text_encoder_dir).resolve())}


def finished_run(stage: str, data_dir: Path | str, run_dir: Path | str, params: Params,
                 max_steps: int | None = None, text_encoder_dir: Path | None = None) -> TrainResult | None:
    """The run in `run_dir` when it finished training `stage` from exactly these inputs, else None (what an
    orchestrator uses to skip a training whose inputs did not change)."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    config, final = run_dir / "config.json", run_dir / "final"
    exported = (final / "model_index.json").is_file() or (final / "base.json").is_file()  # a LoRA run's: the adapter
    if not (config.is_file() and exported and (run_dir / METRICS).is_file()):
        return None
    steps = max_steps or params.train_for(stage).max_steps
    wanted = fingerprint(stage, params, data_dir, steps, Path(text_encoder_dir or tiny_text_encoder_dir()))
    if json.loads(config.read_text()).get("fingerprint") != wanted:
        return None
    rows = atomic.read_jsonl(run_dir / METRICS)
    if not rows or rows[-1]["step"] != steps:
        return None
    return TrainResult(run_dir=run_dir, steps=steps, final=final, losses=[])
