"""`show1 evaluate`: generate a video per prompt with the cascade (from the registry or local folders), score the
videos against a curated split, and publish it all: `OUT/metrics.json` (the numbers), `OUT/details.json` (prompt
set, models, metrics not computed and why), `OUT/per_prompt.json`, the HTML report with its videos and plots, an
MLflow evaluation run, and `eval.<metric>` tags on the model versions used (what `show1 promote` reads).

Three steps, so a flow can map the generation over prompts: `prepare` → `generate_batch` per batch of prompts
(evaluate.batch_size; `generate_one` for one) → `finish`. With evaluate.executor `dask`, the batches run on Dask
worker processes instead (`jobs`, `show1.evaluation.videos`), each worker loading the cascade once.
The output folder is replaced whole at the end (built beside it, then renamed), never left half-written.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from show1 import atomic
from show1.config import Params
from show1.evaluation.prompts import PromptSet, load_prompt_set
from show1.evaluation.reference import reference_videos
from show1.evaluation.report import HistoryPoint, plot_history, render
from show1.evaluation.reuse import RECORD, evaluation_fingerprint, record
from show1.evaluation.scoring import Scores, score
from show1.evaluation.videos import CascadeSpec, GeneratedVideo, GenerationJob, generate_on_dask, render_batch
from show1.pipelines.cascade import check_stages
from show1.pipelines.prompt_batches import PromptBatch, prompt_batches
from show1.provenance import data_version, git_commit
from show1.registry.generation import KIND_TAG, track_generation
from show1.registry.names import CHALLENGER
from show1.registry.promote import record_evaluation
from show1.registry.resolve import LoadedCascade, load_cascade, locate_cascade
from show1.store import connect, experiment_id

DEFAULT_ALIAS = CHALLENGER  # evaluation comes before promotion: the challenger is what needs scoring
REPORT = "report.html"
PLOT = "plots/metrics_by_version.png"


@dataclass
class EvaluationPlan:
    params: Params
    prompts: PromptSet
    cascade: LoadedCascade
    staging: Path
    out: Path
    reference_split: str
    spec: CascadeSpec  # what a Dask worker loads to generate with the same models
    fingerprint: dict[str, Any] | None = None  # what it is made from (registry versions only): evaluation.json


@dataclass
class EvaluationResult:
    out: Path
    metrics: dict[str, float]
    per_prompt: list[dict[str, Any]]
    skipped: dict[str, str]
    run_id: str | None
    sources: dict[str, str]

    @property
    def report(self) -> Path:
        return self.out / REPORT


def prepare(params: Params, prompts: str | Path | None = None, from_registry: str | None = None,
            weights_dir: Path | None = None, reference_split: str | None = None, limit: int | None = None,
            out: Path | None = None, load: bool = True) -> EvaluationPlan:
    """Load the prompt set and the cascade (default: the registry's challenger of every stage in
    evaluate.stages); make the staging folder. `load=False`: only locate the cascade (Dask workers load it)."""
    cfg = params.evaluate
    prompt_set = load_prompt_set(prompts or cfg.prompts, limit or cfg.limit, cfg.videos)
    if from_registry is None and weights_dir is None:
        from_registry = DEFAULT_ALIAS
    stages = check_stages(cfg.stages)
    cascade = (load_cascade if load else locate_cascade)(params, stages, from_registry, weights_dir)
    if load:
        cascade.pipeline.set_progress_bar_config(disable=True)
        cascade.pipeline.to(cfg.device)
    out = Path(out or cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = atomic.staging_folder(out)
    (staging / "videos").mkdir()
    split = reference_split or cfg.reference_split
    fingerprint = (evaluation_fingerprint(params, prompt_set.prompts, cascade.versions, split)
                   if cascade.from_registry else None)
    spec = CascadeSpec(params, stages, cascade.pinned, str(Path(weights_dir).resolve()) if weights_dir else None)
    return EvaluationPlan(params, prompt_set, cascade, staging, out, split, spec, fingerprint)


def generate_one(plan: EvaluationPlan, index: int) -> GeneratedVideo:
    """The video of prompt `index`, seeded by evaluate.seed + index (same settings, same video)."""
    cfg = plan.params.evaluate
    return generate_batch(plan, PromptBatch(index, [plan.prompts.prompts[index]], [cfg.seed + index]))[0]


def generate_batch(plan: EvaluationPlan, batch: PromptBatch) -> list[GeneratedVideo]:
    """The videos of one batch of prompts, with the plan's loaded cascade, in this process."""
    return render_batch(plan.cascade.pipeline, plan.params, batch, plan.staging)


def jobs(plan: EvaluationPlan) -> list[GenerationJob]:
    """The batches as Dask tasks (`show1.evaluation.videos`)."""
    staging = plan.staging.resolve()
    return [GenerationJob(plan.spec, batch, staging) for batch in batches(plan)]


def batches(plan: EvaluationPlan) -> list[PromptBatch]:
    """The prompt set in evaluate.batch_size groups, in order, prompt i with seed evaluate.seed + i."""
    cfg = plan.params.evaluate
    return prompt_batches(list(plan.prompts.prompts), cfg.batch_size, cfg.seed)


def finish(plan: EvaluationPlan, videos: list[GeneratedVideo], track: bool = True,
           on_status: Callable[[str], None] | None = None) -> EvaluationResult:
    """Score, plot, report, log to MLflow, tag the model versions, and publish the output folder."""
    params, cfg = plan.params, plan.params.evaluate
    videos = sorted(videos, key=lambda v: v.index)
    try:
        reference, size = reference_videos(params.paths.curated, plan.reference_split, cfg.max_reference_clips)
        key = {"data_version": data_version(params.paths.curated), "split": plan.reference_split,
               "clips": len(reference), "size": size}
        scores = score([v.frames for v in videos], [v.prompt for v in videos], reference, cfg, key,
                       cache=params.paths.cache, on_status=on_status)
        per_prompt = [{"index": v.index, "prompt": v.prompt, "video": v.files[-1], "seconds": round(v.seconds, 3),
                       "worker": v.worker, **row} for v, row in zip(videos, scores.per_prompt, strict=True)]
        label = _label(plan.cascade)
        client = connect(params.tracking) if track else None
        history = (_history(client, params) if client else []) + [HistoryPoint(label, scores.metrics, current=True)]
        plot = plot_history(history, plan.staging / PLOT)
        facts = {"prompt set": f"{plan.prompts.name} ({len(videos)} prompts, {plan.prompts.source})",
                 "models": ", ".join(f"{s}: {src}" for s, src in plan.cascade.sources.items()),
                 "reference": f"{params.paths.curated}, split {plan.reference_split}: {len(reference)} clips, {size}",
                 "settings": f"steps {cfg.steps or 'published'}, seed {cfg.seed}, {cfg.frames_per_video} frames/video",
                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        rows = [{"prompt": v.prompt, "videos": v.files, "metrics": row} for v, row in zip(videos, scores.per_prompt,
                                                                                          strict=True)]
        atomic.write_text(plan.staging / REPORT, render(f"show1 evaluation — {label}", facts, scores.metrics,
                                                         scores.skipped, rows, PLOT if plot else None))
        # DVC metrics hold numbers only; what was evaluated, and why a metric is missing, go beside them.
        atomic.write_json(plan.staging / "metrics.json", {"prompts": len(videos), **scores.metrics})
        atomic.write_json(plan.staging / "details.json", {"prompt_set": plan.prompts.name,
                                                          "skipped": scores.skipped, "models": plan.cascade.sources})
        atomic.write_json(plan.staging / "per_prompt.json", per_prompt)
        run_id = _log(client, params, plan, scores, label, len(videos)) if client else None
        if run_id:
            for version in plan.cascade.versions.values():
                record_evaluation(client, version.name, version.version, scores.metrics, run_id)
            for video in videos:  # each video traceable with `show1 lineage` (its artifact is in the parent run)
                mp4 = video.files[-1]
                settings = {"seed": cfg.seed + video.index, "steps": cfg.steps or "published",
                            **params.sampling.as_params()}
                track_generation(params, plan.staging / mp4, video.prompt, plan.cascade.sources,
                                 plan.cascade.from_registry, settings, recorded_path=plan.out / mp4,
                                 parent_run_id=run_id, log_video=False)
        if plan.fingerprint is not None:
            atomic.write_text(plan.staging / RECORD, record(plan.fingerprint, run_id, scores.metrics, scores.skipped,
                                                            plan.cascade.sources))
        atomic.replace_folder(plan.staging, plan.out)
    finally:
        shutil.rmtree(plan.staging, ignore_errors=True)
    return EvaluationResult(plan.out, scores.metrics, per_prompt, scores.skipped, run_id, plan.cascade.sources)


def evaluate(params: Params, prompts: str | Path | None = None, from_registry: str | None = None,
             weights_dir: Path | None = None, reference_split: str | None = None, limit: int | None = None,
             out: Path | None = None, track: bool = True,
             on_status: Callable[[str], None] | None = None) -> EvaluationResult:
    """prepare → generate every prompt (here, or on the Dask workers of evaluate.executor) → finish."""
    say = on_status or (lambda _: None)
    executor = params.evaluate.executor
    plan = prepare(params, prompts, from_registry, weights_dir, reference_split, limit, out,
                   load=executor.kind == "local")
    total = len(plan.prompts.prompts)
    try:
        videos: list[GeneratedVideo] = []
        if executor.kind == "dask":
            from show1.dask_cluster import dask_client

            say(f"generating {total} videos on Dask workers")
            finished = [0]

            def progress(done: list[GeneratedVideo]) -> None:
                finished[0] += len(done)
                say(f"generated {finished[0]}/{total} (the last on {done[0].worker})")

            with dask_client(executor, "evaluate.executor.address") as client:
                videos = generate_on_dask(client, jobs(plan), on_videos=progress)
        else:
            for batch in batches(plan):
                shown = "; ".join(prompt[:60] for prompt in batch.prompts)
                say(f"generating {batch.start + len(batch.prompts)}/{total}: {shown}")
                videos.extend(generate_batch(plan, batch))
    except BaseException:
        discard(plan)
        raise
    return finish(plan, videos, track=track, on_status=say)


def discard(plan: EvaluationPlan) -> None:
    """Drop an unfinished evaluation's staging folder (the published output folder is untouched)."""
    shutil.rmtree(plan.staging, ignore_errors=True)


def _label(cascade: LoadedCascade) -> str:
    if cascade.versions:
        return " ".join(f"{s}:v{v.version}" for s, v in cascade.versions.items())
    return "local weights"


def _history(client: Any, params: Params, limit: int = 30) -> list[HistoryPoint]:
    """Earlier evaluations in the experiment, oldest first."""
    runs = client.search_runs([experiment_id(client, params.tracking)],
                              filter_string=f"tags.`{KIND_TAG}` = 'evaluation'",
                              order_by=["attributes.start_time DESC"], max_results=limit)
    return [HistoryPoint(run.data.tags.get("label", run.info.run_id[:8]), dict(run.data.metrics))
            for run in reversed(runs)]


def _log(client: Any, params: Params, plan: EvaluationPlan, scores: Scores, label: str, count: int) -> str:
    from mlflow.entities import Metric, Param

    cfg = params.evaluate
    tags = {KIND_TAG: "evaluation", "mlflow.runName": "evaluate", "label": label, "prompt_set": plan.prompts.name,
            "git_commit": git_commit(), "reference_split": plan.reference_split,
            "stages": ",".join(plan.cascade.sources)}
    prefix = "model." if plan.cascade.from_registry else "weights."
    tags |= {f"{prefix}{stage}": source for stage, source in plan.cascade.sources.items()}
    run = client.create_run(experiment_id(client, params.tracking), run_name="evaluate", tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        settings = {"prompts": count, "steps": cfg.steps or "published",
                    "seed": cfg.seed, "frames_per_video": cfg.frames_per_video,
                    "max_reference_clips": cfg.max_reference_clips, **params.sampling.as_params()}
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in scores.metrics.items()],
                         params=[Param(k, str(v)) for k, v in settings.items()])
        client.log_artifacts(run_id, str(plan.staging), "evaluation")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


