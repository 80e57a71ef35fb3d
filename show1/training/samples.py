"""Short sample videos from the EMA weights during training, through the stage's own pipeline."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from show1.pipelines.base import PromptEmbeddings
from show1.pipelines.weights import assemble_stage
from show1.training.specs import KEYFRAME_STRIDE, SR1_WINDOW, SR_FACTOR


@torch.no_grad()
def sample_video(stage: str, unet: torch.nn.Module, clip: torch.Tensor, embeddings: PromptEmbeddings,
                 steps: int, vae: Any = None, seed: int = 0) -> torch.Tensor:
    """One sample (F, 3, H, W) in [-1, 1] from `unet` for a reference clip (F, 3, H, W) and its caption:
    base draws keyframes from the text; interp fills between the clip's first two keyframes; sr1 upsamples
    the clip's ×4 downsample; sr2 translates the clip. Runs on its own generator and a forked global RNG, so
    sampling never changes what training draws next."""
    video = clip.permute(1, 0, 2, 3)[None]  # (1, 3, F, H, W)
    _, _, f, h, w = video.shape
    pipe = assemble_stage(stage, unet, vae)
    pipe.set_progress_bar_config(disable=True)
    with torch.random.fork_rng(devices=[]):
        generator = torch.Generator().manual_seed(seed)
        if stage == "base":
            out = pipe(prompt_embeds=embeddings, num_frames=len(range(0, f, KEYFRAME_STRIDE)), height=h, width=w,
                       num_inference_steps=steps, generator=generator).frames
        elif stage == "interp":
            out = pipe(video[:, :, [0, KEYFRAME_STRIDE]], prompt_embeds=embeddings, num_inference_steps=steps,
                       generator=generator).frames
        elif stage == "sr1":
            window = video[:, :, :SR1_WINDOW]
            flat = window.permute(0, 2, 1, 3, 4).reshape(-1, 3, h, w)
            low = F.interpolate(flat, (h // SR_FACTOR, w // SR_FACTOR), mode="area")
            low = low.reshape(1, -1, 3, h // SR_FACTOR, w // SR_FACTOR).permute(0, 2, 1, 3, 4)
            out = pipe(low, prompt_embeds=embeddings, height=h, width=w, num_inference_steps=steps,
                       generator=generator).frames
        else:
            out = pipe(video[:, :, :SR1_WINDOW], prompt_embeds=embeddings, height=h, width=w,
                       num_inference_steps=max(steps, 2), generator=generator).frames
    return out[0].permute(1, 0, 2, 3).float()
