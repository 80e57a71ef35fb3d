"""Stage `interp`: 8 keyframes → 29 frames at 64×40, one 5-frame run per adjacent keyframe pair.

The 7 runs depend only on the keyframes and share one start noise (as in the reference), so on a GPU they denoise
together as one batch: one UNet call per step instead of 7, which is what keeps a GPU busy at 64×40. The result is
the one-at-a-time result (the same math per segment; tested within float noise). `segments_per_batch` sets the batch
(1: one segment at a time, the reference's order of UNet calls); by default all on a GPU and one at a time on a CPU,
where the batch was not faster (7 segments × 4 steps of the tiny UNet at 64×40 on 2 cores: 4.3-4.9 s one at a time,
5.1-5.2 s as one batch). A scheduler that draws noise at every step runs them one at a time, so each segment
draws what it draws alone."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from show1.pipelines.base import PromptEmbeddings, Show1StagePipeline, VideoPipelineOutput, step_draws_noise
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
                 return_dict: bool = True, segments_per_batch: int | None = None) -> VideoPipelineOutput | tuple:
        if segments_per_batch is not None and segments_per_batch < 1:
            raise ValueError(f"segments_per_batch must be at least 1 (or None: all at once), got {segments_per_batch}")
        video, text = self._video_and_text(video, 2, prompt, prompt_embeds, negative_prompt, guidance_scale)
        b, _, keyframes, h, w = video.shape
        segments = keyframes - 1
        default = segments if self._execution_device.type == "cuda" else 1
        per_batch = 1 if step_draws_noise(self.scheduler) else min(segments_per_batch or default, segments)
        out = torch.zeros(b, 3, (SEGMENT - 1) * segments + 1, h, w, device=video.device, dtype=video.dtype)
        with self.rng_scope(generator):
            # One noise draw shared by every segment, as in the reference.
            noise = self.initial_noise((b, 3, SEGMENT, h, w), draw_point(generator), video.dtype)
            for first in range(0, segments, per_batch):
                chosen = range(first, min(first + per_batch, segments))
                # Segment-major: rows j·B … j·B+B−1 are segment first+j of each video.
                condition = torch.cat([interpolation_condition(video[:, :, [i, i + 1]]) for i in chosen])
                runs = self.denoise_pixels(noise.repeat(len(chosen), 1, 1, 1, 1), _tiled(text, len(chosen),
                                                                                          guidance_scale > 1.0),
                                           guidance_scale, num_inference_steps, condition=condition,
                                           generator=draw_point(generator))
                for j, i in enumerate(chosen):  # in order: a segment's first frame replaces the previous one's last
                    out[:, :, i * (SEGMENT - 1):i * (SEGMENT - 1) + SEGMENT] = runs[j * b:(j + 1) * b]
        self.maybe_free_model_hooks()
        out = out.clamp(-1, 1) if clamp_output else out
        return VideoPipelineOutput(frames=out) if return_dict else (out,)


def _tiled(text: torch.Tensor, copies: int, guidance: bool) -> torch.Tensor:
    """Text embeddings for `copies` segments stacked segment-major; under guidance the unconditional half stays
    first (denoise_pixels doubles the samples the same way)."""
    if copies == 1:
        return text
    if not guidance:
        return text.repeat(copies, 1, 1)
    negative, positive = text.chunk(2)
    return torch.cat([negative.repeat(copies, 1, 1), positive.repeat(copies, 1, 1)])
