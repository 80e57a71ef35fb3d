"""The evaluation's videos: a batch of prompts through the cascade, written to the evaluation's staging folder, in
this process or on the worker processes of a Dask cluster (`evaluate.executor`).

On Dask, each batch is a task that carries only what names the cascade (`CascadeSpec`: the params and the registry
versions pinned to their numbers, or a weights folder), its prompts and seeds, and the staging folder. A worker
loads the cascade the first time it gets a task and keeps it for the next ones, so each worker loads it once;
batches go to whichever worker is free. Every prompt keeps its seed (evaluate.seed + its index) and the batches
are the serial run's, so the videos and the metrics are the serial run's. Workers must see the same files (one
machine, or a shared file system) and, on GPUs, one device each (`CUDA_VISIBLE_DEVICES`, as dask-cuda sets it).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from show1.config import Params
from show1.pipelines.prompt_batches import PromptBatch


@dataclass
class GeneratedVideo:
    index: int
    prompt: str
    frames: np.ndarray  # uint8 (F, H, W, 3)
    files: list[str]  # relative to the output folder: webm (plays everywhere) then mp4
    seconds: float
    worker: str  # host:pid of the process that generated it


@dataclass(frozen=True)
class CascadeSpec:
    """What a worker loads: the same models as the evaluation's (registry versions by number, never by alias, so a
    promotion during the run changes nothing), with the same settings."""

    params: Params
    stages: tuple[str, ...]
    from_registry: str | None  # pinned versions, `base=3,interp=2`
    weights_dir: str | None  # absolute

    def key(self) -> str:
        return json.dumps([self.params.model_dump(mode="json"), self.stages, self.from_registry, self.weights_dir],
                          sort_keys=True, default=str)


@dataclass(frozen=True)
class GenerationJob:
    cascade: CascadeSpec
    batch: PromptBatch
    staging: Path  # absolute: the evaluation's staging folder (videos/ is written there)


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def render_batch(pipeline: Any, params: Params, batch: PromptBatch, staging: Path) -> list[GeneratedVideo]:
    """The videos of one batch of prompts, generated together through the cascade (as `show1 generate --prompts`),
    prompt i seeded by its seed in the batch; written to `staging/videos/NNN.webm` and `.mp4`. `seconds` of each
    video: the batch's time shared out."""
    from show1.data.video import to_uint8_frames, write_video

    cfg = params.evaluate
    started = time.perf_counter()
    frames = pipeline(batch.prompts, seed=batch.seeds, num_inference_steps=cfg.steps, sampling=params.sampling).frames
    seconds = (time.perf_counter() - started) / len(batch.prompts)
    videos = []
    for offset, (prompt, one) in enumerate(zip(batch.prompts, frames, strict=True)):
        index = batch.start + offset
        video = to_uint8_frames(one.permute(1, 0, 2, 3))
        names = [f"videos/{index:03d}.webm", f"videos/{index:03d}.mp4"]
        for name in names:
            write_video(video, staging / name, fps=cfg.fps)
        videos.append(GeneratedVideo(index, prompt, video, names, seconds, this_worker()))
    return videos


_LOADED: dict[str, Any] = {}  # this worker's cascade, by CascadeSpec.key()


def worker_cascade(spec: CascadeSpec) -> Any:
    """This process's pipeline for `spec`: loaded (and moved to evaluate.device) on first use, then kept. One at a
    time: a task for another cascade replaces it."""
    key = spec.key()
    if key not in _LOADED:
        from show1.registry.resolve import load_cascade

        _LOADED.clear()
        weights = Path(spec.weights_dir) if spec.weights_dir else None
        pipeline = load_cascade(spec.params, spec.stages, spec.from_registry, weights).pipeline
        pipeline.set_progress_bar_config(disable=True)
        _LOADED[key] = pipeline.to(spec.params.evaluate.device)
    return _LOADED[key]


def run_job(job: GenerationJob) -> list[GeneratedVideo]:
    """A Dask task: one batch's videos, with this worker's cascade."""
    return render_batch(worker_cascade(job.cascade), job.cascade.params, job.batch, job.staging)


def generate_on_dask(client: Any, jobs: list[GenerationJob],
                     on_videos: Callable[[list[GeneratedVideo]], None] | None = None) -> list[GeneratedVideo]:
    """Every job's videos, the jobs spread over the cluster's workers; in prompt order. A task that raises fails
    the evaluation (the other tasks are cancelled); a lost worker's tasks are rescheduled by Dask."""
    from distributed import as_completed

    run = uuid.uuid4().hex[:8]
    futures = client.map(run_job, jobs, pure=False,
                         key=[f"evaluate-batch-{job.batch.start:05d}-{run}" for job in jobs])
    videos: list[GeneratedVideo] = []
    try:
        for future in as_completed(futures):
            done = future.result()
            videos.extend(done)
            if on_videos:
                on_videos(done)
    finally:
        client.cancel(futures)
    return sorted(videos, key=lambda v: v.index)
