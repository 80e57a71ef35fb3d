"""The cascade: any prefix of base → interp → sr1 → sr2, with the text embeddings computed once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from show1.models.configs import DEFAULTS, STAGE_FOLDERS, STAGES
from show1.pipelines.base import MissingComponentError, PromptEmbeddings, Show1StagePipeline
from show1.pipelines.interpolation import Show1InterpolationPipeline
from show1.pipelines.keyframes import Show1BasePipeline
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


@dataclass
class CascadeOutput:
    """`frames`: the last stage's video (B, 3, F, H, W) in [-1, 1]; `stages`: every stage's output."""

    frames: torch.Tensor
    stages: dict[str, torch.Tensor] = field(default_factory=dict)


class Show1Pipeline:
    """Runs the stage pipelines in order, sharing the base stage's prompt embeddings with interp and sr1
    (and with sr2 when its folder has no text encoder of its own)."""

    def __init__(self, stages: dict[str, Show1StagePipeline]):
        self.stage_names = check_stages(list(stages))
        self.stages = stages

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, stages: list[str] | tuple[str, ...] = STAGES,
                        torch_dtype: torch.dtype | None = None) -> Show1Pipeline:
        """Load `weights_dir/show-1-base`, `show-1-interpolation`, `show-1-sr1`, `show-1-sr2` (as published
        or as written by `show1 init-weights`)."""
        weights_dir = Path(weights_dir)
        if not weights_dir.is_dir():
            raise FileNotFoundError(f"{weights_dir}: weights folder not found")
        loaded: dict[str, Show1StagePipeline] = {}
        for stage in check_stages(stages):
            folder = weights_dir / STAGE_FOLDERS[stage]
            if not folder.is_dir():
                raise MissingComponentError(f"{weights_dir}: missing stage folder '{STAGE_FOLDERS[stage]}' ({stage})")
            # interp and sr1 share the base's T5 embeddings: no need to load their copies of it.
            own_text = stage in ("base", "sr2")
            loaded[stage] = STAGE_PIPELINES[stage].from_pretrained(folder, torch_dtype=torch_dtype,
                                                                   load_text_encoder_=own_text)
        if loaded["base"].text_encoder is None:
            raise MissingComponentError(f"{weights_dir / STAGE_FOLDERS['base']}: missing component 'text_encoder/'")
        return cls(loaded)

    def to(self, device: torch.device | str) -> Show1Pipeline:
        for pipe in self.stages.values():
            pipe.to(device)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda") -> None:
        for pipe in self.stages.values():
            pipe.enable_model_cpu_offload(device=device)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        for pipe in self.stages.values():
            pipe.set_progress_bar_config(**kwargs)

    @torch.no_grad()
    def __call__(self, prompt: str, generator: torch.Generator | None = None,
                 num_inference_steps: int | dict[str, int] | None = None,
                 guidance_scale: dict[str, float] | None = None) -> CascadeOutput:
        """Generate a video for `prompt`. `num_inference_steps` is one number for every stage or a
        per-stage dict; stages not named use the published defaults (75/75/125/50)."""
        steps = {s: DEFAULTS[s]["num_inference_steps"] for s in STAGES}
        if isinstance(num_inference_steps, int):
            steps = dict.fromkeys(STAGES, num_inference_steps)
        elif num_inference_steps:
            steps |= num_inference_steps
        guidance = {s: DEFAULTS[s]["guidance_scale"] for s in STAGES} | (guidance_scale or {})
        base = self.stages["base"]
        embeddings = base.encode_prompts(prompt, "", guidance=True)
        outputs: dict[str, torch.Tensor] = {}
        video = base(prompt_embeds=embeddings, num_inference_steps=steps["base"],
                     guidance_scale=guidance["base"], generator=generator).frames
        outputs["base"] = video
        if "interp" in self.stages:
            video = self.stages["interp"](video, prompt_embeds=embeddings, num_inference_steps=steps["interp"],
                                          guidance_scale=guidance["interp"], generator=generator).frames
            outputs["interp"] = video
        if "sr1" in self.stages:
            video = self.stages["sr1"](video, prompt_embeds=embeddings, num_inference_steps=steps["sr1"],
                                       guidance_scale=guidance["sr1"], noise_level=DEFAULTS["sr1"]["noise_level"],
                                       generator=generator).frames
            outputs["sr1"] = video
        if "sr2" in self.stages:
            sr2 = self.stages["sr2"]
            sr2_embeddings: PromptEmbeddings | None = None
            if sr2.text_encoder is None:  # tiny weights: the base encoder serves sr2 too
                sr2_embeddings = base.encode_prompts(prompt, SR2_NEGATIVE_PROMPT, guidance=True)
            video = sr2(video, prompt=prompt, prompt_embeds=sr2_embeddings, num_inference_steps=steps["sr2"],
                        guidance_scale=guidance["sr2"], strength=DEFAULTS["sr2"]["strength"],
                        generator=generator).frames
            outputs["sr2"] = video
        return CascadeOutput(frames=video, stages=outputs)
