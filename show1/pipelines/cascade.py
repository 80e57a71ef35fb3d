"""The cascade: any prefix of base → interp → sr1 → sr2, with the text embeddings computed once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from show1.config import Sampling
from show1.models.configs import DEFAULTS, STAGE_FOLDERS, STAGES
from show1.models.text import cuts_reported_once
from show1.pipelines.base import MissingComponentError, PromptEmbeddings, Show1StagePipeline, with_final_sigmas
from show1.pipelines.first_frame import super_resolve_first_frame
from show1.pipelines.interpolation import Show1InterpolationPipeline
from show1.pipelines.keyframes import Show1BasePipeline
from show1.pipelines.seeding import PerVideo, RandomSource, Reseeding, draw_point
from show1.pipelines.sr1 import Show1SR1Pipeline
from show1.pipelines.sr2 import NEGATIVE_PROMPT as SR2_NEGATIVE_PROMPT
from show1.pipelines.sr2 import Show1SR2Pipeline

STAGE_PIPELINES: dict[str, type[Show1StagePipeline]] = {
    "base": Show1BasePipeline, "interp": Show1InterpolationPipeline, "sr1": Show1SR1Pipeline, "sr2": Show1SR2Pipeline}


def check_stages(stages: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Stages must be a prefix of base, interp, sr1, sr2 (each needs the one before it)."""
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    if not stages or stages != STAGES[:len(stages)]:
        raise ValueError(f"stages {list(stages)} are out of order: use a prefix of {', '.join(STAGES)} "
                         f"(e.g. base,interp)")
    return stages


def stage_folders(weights_dir: str | Path, stages: list[str] | tuple[str, ...] = STAGES) -> dict[str, Path]:
    """`weights_dir/show-1-base`, … for `stages` (the published layout, as `show1 init-weights` writes it), each
    checked to exist."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"{weights_dir}: weights folder not found")
    folders = {}
    for stage in check_stages(stages):
        folders[stage] = weights_dir / STAGE_FOLDERS[stage]
        if not folders[stage].is_dir():
            raise MissingComponentError(f"{weights_dir}: missing stage folder '{STAGE_FOLDERS[stage]}' ({stage})")
    return folders


@dataclass
class CascadeOutput:
    """`frames`: the last stage's video (B, 3, F, H, W) in [-1, 1]; `stages`: every stage's output."""

    frames: torch.Tensor
    stages: dict[str, torch.Tensor] = field(default_factory=dict)


class Show1Pipeline:
    """Runs the stage pipelines in order, sharing the base stage's prompt embeddings with interp and sr1
    (and with sr2 when its folder has no text encoder of its own). `first_frame_model`: DeepFloyd IF-II-L (an
    `IFSuperResolutionPipeline`, see first_frame.py) for sr1's first frame, as the reference does; None: sr1's
    window 0 is conditioned on the noised upsample."""

    def __init__(self, stages: dict[str, Show1StagePipeline], first_frame_model: Any = None):
        self.stage_names = check_stages(list(stages))
        self.stages = stages
        self.first_frame_model = first_frame_model

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, stages: list[str] | tuple[str, ...] = STAGES,
                        torch_dtype: torch.dtype | None = None) -> Show1Pipeline:
        """Load `weights_dir/show-1-base`, `show-1-interpolation`, `show-1-sr1`, `show-1-sr2` (as published
        or as written by `show1 init-weights`)."""
        return cls.from_folders(stage_folders(weights_dir, stages), torch_dtype)

    @classmethod
    def from_folders(cls, folders: dict[str, Path], torch_dtype: torch.dtype | None = None) -> Show1Pipeline:
        """Load one stage folder per stage (e.g. downloaded from the model registry)."""
        loaded: dict[str, Show1StagePipeline] = {}
        for stage in check_stages(list(folders)):
            # interp and sr1 share the base's T5 embeddings: no need to load their copies of it.
            own_text = stage in ("base", "sr2")
            loaded[stage] = STAGE_PIPELINES[stage].from_pretrained(folders[stage], torch_dtype=torch_dtype,
                                                                   load_text_encoder_=own_text)
        if loaded["base"].text_encoder is None:
            raise MissingComponentError(f"{folders['base']}: missing component 'text_encoder/'")
        return cls(loaded)

    def _pipelines(self) -> list[Any]:
        return [*self.stages.values(), *([self.first_frame_model] if self.first_frame_model is not None else [])]

    def to(self, device: torch.device | str) -> Show1Pipeline:
        for pipe in self._pipelines():
            pipe.to(device)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda") -> None:
        for pipe in self._pipelines():
            pipe.enable_model_cpu_offload(device=device)

    def enable_sequential_cpu_offload(self, device: torch.device | str = "cuda") -> None:
        for pipe in self._pipelines():
            pipe.enable_sequential_cpu_offload(device=device)

    def place(self, device: torch.device | str, offload: str = "none") -> Show1Pipeline:
        """Put the cascade on `device`: `none` moves every stage there; `model` keeps each stage's models on the
        CPU until its turn (one on the GPU at a time); `sequential` streams the layers of each model to the GPU one
        by one (least memory, slowest)."""
        if offload == "none":
            return self.to(device)
        if offload == "model":
            self.enable_model_cpu_offload(device)
        elif offload == "sequential":
            self.enable_sequential_cpu_offload(device)
        else:
            raise ValueError(f"offload {offload!r} is not one of none, model, sequential")
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        for pipe in self._pipelines():
            pipe.set_progress_bar_config(**kwargs)

    def first_frame(self, video: torch.Tensor, embeddings: PromptEmbeddings,
                    source: RandomSource) -> torch.Tensor | None:
        """sr1's first frame for the interpolated `video` (B, 3, F, h, w): IF-II-L's ×4 super-resolution of frame 0
        (the seed set again under the reference's seeding), or None without a first-frame model."""
        if self.first_frame_model is None:
            return None
        _, _, _, h, w = video.shape
        with self.stages["sr1"].rng_scope(source):
            return super_resolve_first_frame(self.first_frame_model, video[:, :, 0], embeddings, 4 * h, 4 * w,
                                             draw_point(source))

    @torch.no_grad()
    @cuts_reported_once()  # a prompt too long for the text encoder is reported once, not by every stage
    def __call__(self, prompt: str | list[str], generator: RandomSource = None,
                 num_inference_steps: int | dict[str, int] | None = None,
                 guidance_scale: dict[str, float] | None = None, *, seed: int | Sequence[int] | None = None,
                 sampling: Sampling | None = None, prompt_embeds: PromptEmbeddings | None = None,
                 keyframe_size: tuple[int, int] | None = None) -> CascadeOutput:
        """Generate a video for `prompt`, or one per prompt of a list, as one batch through every stage.
        `num_inference_steps` is one number for every stage or a per-stage dict; stages not named use the published
        defaults (75/75/125/50).

        Randomness: pass `seed` and the cascade draws as `sampling.seeding` says (default: the reference's
        reseeding at every stage, segment and window; `stream`: one generator seeded with `seed`), or pass your own
        `generator`, carried through every stage. A batch of prompts takes one seed per prompt (an int `seed` means
        seed, seed + 1, …): video i then equals the video of prompt i generated alone with its seed (`PerVideo`), up
        to float rounding of the batched arithmetic. `sampling` (default: `Sampling()`, the published behaviour) also
        sets DPM-Solver's last step, prompt lowercasing and the base stage's reference dropout. `prompt_embeds`:
        the base stage's text embeddings computed beforehand (then `prompt` only reaches sr2's own encoder).
        `keyframe_size`: (width, height) of the keyframes instead of the published 64 × 40 (multiples of 8; the
        interpolation keeps it, sr1 makes it ×4; sr2 keeps its own output size).

        As in the reference, each pixel stage hands its frames on unclamped; `stages` and `frames` are clamped to
        [-1, 1]."""
        sampling = sampling or Sampling()
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        source: RandomSource = generator
        if seed is not None:
            source = seeded_source(seed, 1 if isinstance(prompt, str) else len(prompt), sampling.seeding)
        steps: dict[str, int | None] = dict.fromkeys(STAGES)
        if isinstance(num_inference_steps, int):
            steps = dict.fromkeys(STAGES, num_inference_steps)
        elif num_inference_steps:
            steps |= num_inference_steps
        guidance = guidance_scale or {}
        for pipe in self.stages.values():
            pipe.scheduler = with_final_sigmas(pipe.scheduler, sampling.final_sigmas_type)
        base = self.stages["base"]
        lowercase = sampling.lowercase_prompts
        embeddings = prompt_embeds or base.encode_prompts(prompt, "", guidance=True, lowercase=lowercase)
        outputs: dict[str, torch.Tensor] = {}
        video: torch.Tensor | None = None
        for stage in self.stage_names:
            pipe = self.stages[stage]
            stage_embeddings: PromptEmbeddings | None = embeddings
            if stage == "sr2":  # its own negative prompt; tiny weights without an encoder borrow the base's
                stage_embeddings = None if pipe.text_encoder is not None else \
                    base.encode_prompts(prompt, SR2_NEGATIVE_PROMPT, guidance=True, lowercase=lowercase)
            options: dict[str, Any] = {"reference_dropout": sampling.reference_dropout} if stage == "base" else {}
            if keyframe_size is not None and stage in ("base", "sr1"):
                scale = 1 if stage == "base" else 4
                options |= {"width": scale * keyframe_size[0], "height": scale * keyframe_size[1]}
            if stage == "sr1" and video is not None:
                options["first_frame"] = self.first_frame(video, embeddings, source)
            if stage != "sr2":
                options["clamp_output"] = False
            video = run_stage(stage, pipe, prompt, video, stage_embeddings, steps[stage], guidance.get(stage),
                              source, **options)
            outputs[stage] = video.clamp(-1, 1)
        return CascadeOutput(frames=outputs[self.stage_names[-1]], stages=outputs)


def seeded_source(seed: int | Sequence[int], videos: int, seeding: str) -> RandomSource:
    """The random source of `videos` videos from `seed` (one int: seed, seed + 1, …; or one seed per video), drawn
    as `seeding` says (`reference` | `stream`). One video: its own source; several: `PerVideo`."""
    seeds = [seed + i for i in range(videos)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != videos:
        raise ValueError(f"{len(seeds)} seeds for {videos} prompts: pass one seed, or one per prompt")

    def one(value: int) -> Reseeding | torch.Generator:
        return Reseeding(value) if seeding == "reference" else torch.Generator("cpu").manual_seed(value)

    return one(seeds[0]) if videos == 1 else PerVideo(tuple(one(s) for s in seeds))


def run_stage(stage: str, pipe: Show1StagePipeline, prompt: str | list[str], video: torch.Tensor | None,
              embeddings: PromptEmbeddings | None = None, num_inference_steps: int | None = None,
              guidance_scale: float | None = None, generator: RandomSource = None,
              **options: Any) -> torch.Tensor:
    """One stage of the cascade with the published settings (DEFAULTS) unless given: `video` is the previous
    stage's output (None for base); `embeddings` replace encoding `prompt` with the stage's own encoder;
    `generator` a generator or the reference's `Reseeding`; `options` are the stage's extras (sr1 `noise_level`,
    sr2 `strength`, base `reference_dropout`)."""
    settings = DEFAULTS[stage] | {k: v for k, v in options.items() if v is not None}
    if num_inference_steps is not None:
        settings["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        settings["guidance_scale"] = guidance_scale
    if stage == "base":
        return pipe(prompt=prompt, prompt_embeds=embeddings, generator=generator, **settings).frames
    if video is None:
        raise ValueError(f"the {stage} stage needs the previous stage's video")
    return pipe(video, prompt=prompt, prompt_embeds=embeddings, generator=generator, **settings).frames
