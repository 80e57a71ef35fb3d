"""sr1's first frame: DeepFloyd IF-II-L's image super-resolution of frame 0.

Show-1's reference super-resolves the first low-res frame with diffusers' `IFSuperResolutionPipeline` on
`DeepFloyd/IF-II-L-v1.0` (70 steps, guidance 4.0, noise level 150, the base stage's T5 embeddings, the seed set
again) and conditions sr1's window 0 on it, clean. show1 does the same when `sampling.first_frame_model` names a
local IF-II-L folder (safetensors only, like every weight show1 loads). Its T5 encoder is not loaded: the base
stage's prompt embeddings are passed, as in the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from show1.models.configs import FIRST_FRAME_COMPONENTS
from show1.pipelines.base import PromptEmbeddings
from show1.weight_files import check_parts

# run_inference.py's settings for the IF-II-L call.
FIRST_FRAME_SETTINGS: dict[str, Any] = {"num_inference_steps": 70, "guidance_scale": 4.0, "noise_level": 150}
WHAT = "sampling.first_frame_model"  # how errors name the folder


def load_first_frame_model(folder: Path | str, torch_dtype: torch.dtype | None = None) -> Any:
    """An `IFSuperResolutionPipeline` from a local IF-II-L folder, without its text encoder, safety checker or
    watermarker (the reference loads it with `text_encoder=None`; the frame is a condition, not an output)."""
    from diffusers import IFSuperResolutionPipeline

    folder = check_parts(folder, FIRST_FRAME_COMPONENTS, WHAT)  # safetensors only
    pipe = IFSuperResolutionPipeline.from_pretrained(
        folder, tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None, watermarker=None,
        requires_safety_checker=False, torch_dtype=torch_dtype, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def super_resolve_first_frame(pipe: Any, frame: torch.Tensor, embeddings: PromptEmbeddings, height: int, width: int,
                              generator: torch.Generator | list[torch.Generator] | None,
                              **settings: Any) -> torch.Tensor:
    """Frame 0 (B, 3, h, w) in [-1, 1] → (B, 3, height, width), as the reference's IF-II-L call makes it (unclamped,
    `output_type="pt"`). `settings` override FIRST_FRAME_SETTINGS."""
    if embeddings.negative is None:
        raise ValueError("the first frame needs negative prompt embeddings (IF-II-L samples with guidance)")
    dtype = pipe.unet.dtype
    return pipe(image=frame.to(dtype), prompt_embeds=embeddings.positive.to(dtype),
                negative_prompt_embeds=embeddings.negative.to(dtype), height=height, width=width,
                generator=generator, output_type="pt", **(FIRST_FRAME_SETTINGS | settings)).images
