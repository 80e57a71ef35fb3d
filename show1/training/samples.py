"""Short sample videos from the EMA weights during training, through the stage's own pipeline."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from show1.pipelines.base import PromptEmbeddings
from show1.pipelines.weights import assemble_stage
from show1.training.specs import KEYFRAME_STRIDE, SR1_WINDOW, SR_FACTOR


def _keyframes(pipe: Any, video: torch.Tensor, embeddings: PromptEmbeddings, steps: int, generator: Any) -> Any:
    """base: keyframes from the text, as many as the clip holds."""
    _, _, f, h, w = video.shape
    return pipe(prompt_embeds=embeddings, num_frames=len(range(0, f, KEYFRAME_STRIDE)), height=h, width=w,
                num_inference_steps=steps, generator=generator)


def _interpolation(pipe: Any, video: torch.Tensor, embeddings: PromptEmbeddings, steps: int, generator: Any) -> Any:
    """interp: the frames between the clip's first two keyframes."""
    return pipe(video[:, :, [0, KEYFRAME_STRIDE]], prompt_embeds=embeddings, num_inference_steps=steps,
                generator=generator)


def _super_resolution(pipe: Any, video: torch.Tensor, embeddings: PromptEmbeddings, steps: int,
                      generator: Any) -> Any:
    """sr1: the clip's first window back from its ×4 downsample."""
    _, _, _, h, w = video.shape
    window = video[:, :, :SR1_WINDOW]
    flat = window.permute(0, 2, 1, 3, 4).reshape(-1, 3, h, w)
    low = F.interpolate(flat, (h // SR_FACTOR, w // SR_FACTOR), mode="area")
    low = low.reshape(1, -1, 3, h // SR_FACTOR, w // SR_FACTOR).permute(0, 2, 1, 3, 4)
    return pipe(low, prompt_embeds=embeddings, height=h, width=w, num_inference_steps=steps, generator=generator)


def _translation(pipe: Any, video: torch.Tensor, embeddings: PromptEmbeddings, steps: int, generator: Any) -> Any:
    """sr2: the clip's first window translated (at least 2 steps: its schedule starts part-way)."""
    _, _, _, h, w = video.shape
    return pipe(video[:, :, :SR1_WINDOW], prompt_embeds=embeddings, height=h, width=w,
                num_inference_steps=max(steps, 2), generator=generator)


SAMPLERS = {"base": _keyframes, "interp": _interpolation, "sr1": _super_resolution, "sr2": _translation}


@torch.no_grad()
def sample_video(stage: str, unet: torch.nn.Module, clip: torch.Tensor, embeddings: PromptEmbeddings,
                 steps: int, vae: Any = None, seed: int = 0) -> torch.Tensor:
    """One sample (F, 3, H, W) in [-1, 1] from `unet` for a reference clip (F, 3, H, W) and its caption, through
    the stage's own pipeline (SAMPLERS). Runs on its own generator and a forked global RNG, so sampling never
    changes what training draws next."""
    video = clip.permute(1, 0, 2, 3)[None]  # (1, 3, F, H, W)
    pipe = assemble_stage(stage, unet, vae)
    pipe.set_progress_bar_config(disable=True)
    with torch.random.fork_rng(devices=[]):
        out = SAMPLERS[stage](pipe, video, embeddings, steps, torch.Generator().manual_seed(seed)).frames
    return out[0].permute(1, 0, 2, 3).float()
