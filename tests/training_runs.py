"""What the data-parallel training tests share (test_training_ddp.py, test_training_multinode.py): the small run that
several processes train like one, the environment of the processes they start, and how their runs are compared."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 4, 2
# The demo clips at a quarter of the tiny sizes; every draw of a clip is random (caption dropout included); a global
# batch of 4 in 2 micro-steps (accumulation), so each of 2 processes takes 1 clip per micro-step.
# The learning rate is small because AdamW's first steps move each weight by about ±lr whatever the size of its
# gradient: a gradient element that sums to ~0 over the batch (the zero-initialised temporal convolutions have
# many) takes its sign from float summation order, which differs between one process and two. At 1e-3 such elements
# differ by 2e-3 after one step (measured); at 4e-6 no weight can drift 1e-4 in 4 steps (1e-5: 9e-5 in 6, measured).
SMALL = {
    "curate": {"clip": {"sizes": [[32, 20], [128, 80]], "stride": 8}},
    "train": {"learning_rate": 4e-6, "caption_dropout": 0.3, "batch_size": 4, "grad_accum": 2, "sample_every": 0,
              "keep_last": 5},
}
WEIGHTS = "final/unet/diffusion_pytorch_model.safetensors"


def environment() -> dict[str, str]:
    """This environment for a training process the test starts, without what would steer it elsewhere."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("MLFLOW_TRACKING_URI", "SHOW1_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                 "MASTER_PORT"):
        env.pop(name, None)
    return env


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def worst_difference(run: Path, other: Path, name: str = WEIGHTS) -> float:
    mine, theirs = load_file(str(run / name)), load_file(str(other / name))
    assert mine.keys() == theirs.keys()
    return max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
