"""Stage `interp`: 8 keyframes → 29 frames at 64×40, one 5-frame run per adjacent keyframe pair."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from show1.pipelines.base import PromptEmbeddings, Show1StagePipeline, VideoPipelineOutput
from show1.pipelines.seeding import RandomSource, draw_point

SEGMENT = 5  # frames per run: the two keyframes and three new ones between them


def interpolation_condition(ends: torch.Tensor, frames: int = SEGMENT) -> torch.Tensor:
    """The UNet condition for one segment: the two end frames blended linearly (trilinear resize over
    time) plus a mask channel that is 1 on the end frames. `ends` is (B, 3, 2, H, W); returns (B, 4, frames, H, W)."""
    b, _, _, h, w = ends.shape
    blended = F.interpolate(ends, (frames, h, w), mode="trilinear", align_corners=True)
    mask = torch.zeros(b, 1, frames, h, w, device=ends.device, dtype=ends.dtype)
    mask[:, :, 0] = 1
    mask[:, :, -1] = 1
    return torch.cat([blended, mask], dim=1)


class Show1InterpolationPipeline(Show1StagePipeline):
    """Keyframes (B, 3, K, H, W) → (B, 3, 4·(K−1)+1, H, W): 8 → 29 frames, keyframes at 0, 4, …, 28."""

    def __init__(self, unet: Any, scheduler: Any, tokenizer: Any = None, text_encoder: Any = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder)

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, prompt: str | list[str] | None = None,
                 prompt_embeds: PromptEmbeddings | None = None, negative_prompt: str | list[str] | None = "",
                 num_inference_steps: int = 75, guidance_scale: float = 4.0,
                 generator: RandomSource = None, clamp_output: bool = True,
                 return_dict: bool = True) -> VideoPipelineOutput | tuple:
        video, text = self._video_and_text(video, 2, prompt, prompt_embeds, negative_prompt, guidance_scale)
        b, _, keyframes, h, w = video.shape
        out = torch.zeros(b, 3, (SEGMENT - 1) * (keyframes - 1) + 1, h, w, device=video.device, dtype=video.dtype)
        with self.rng_scope(generator):
            # One noise draw shared by every segment, as in the reference.
            noise = self.initial_noise((b, 3, SEGMENT, h, w), draw_point(generator), video.dtype)
            for i in range(keyframes - 1):
                condition = interpolation_condition(video[:, :, [i, i + 1]])
                segment = self.denoise_pixels(noise.clone(), text, guidance_scale, num_inference_steps,
                                              condition=condition, generator=draw_point(generator))
                out[:, :, i * (SEGMENT - 1):i * (SEGMENT - 1) + SEGMENT] = segment  # ends are regenerated too
        self.maybe_free_model_hooks()
        out = out.clamp(-1, 1) if clamp_output else out
        return VideoPipelineOutput(frames=out) if return_dict else (out,)
