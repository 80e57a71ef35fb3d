"""Stage `base`: text → 8 keyframes at 64×40 (pixel UNet3D, IF-I style)."""

from __future__ import annotations

from typing import Any

import torch

from show1.pipelines.base import PromptEmbeddings, Show1StagePipeline, VideoPipelineOutput
from show1.pipelines.seeding import PerVideo, RandomSource, draw_point


class Show1BasePipeline(Show1StagePipeline):
    """Text-to-keyframes: `pipe("a panda", generator=g).frames` is (B, 3, 8, 40, 64) in [-1, 1].

    `reference_dropout=True` samples with the UNet in training mode, so its temporal convolutions' dropout is
    active: the reference's `enable_model_cpu_offload` does that by mistake, and its videos were made so. For
    bit-reproducing them only (`sampling.reference_dropout`).
    """

    def __init__(self, unet: Any, scheduler: Any, tokenizer: Any = None, text_encoder: Any = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, prompt_embeds: PromptEmbeddings | None = None,
                 negative_prompt: str | list[str] | None = "", num_frames: int = 8, height: int = 40, width: int = 64,
                 num_inference_steps: int = 75, guidance_scale: float = 9.0,
                 generator: RandomSource = None, reference_dropout: bool = False,
                 clamp_output: bool = True,
                 return_dict: bool = True) -> VideoPipelineOutput | tuple:
        if num_frames < 1 or height < 1 or width < 1 or num_inference_steps < 1:
            raise ValueError("num_frames, height, width and num_inference_steps must be positive")
        if reference_dropout and isinstance(generator, PerVideo):
            raise ValueError("reference_dropout draws from the global random state, which a batch of videos with "
                             "their own seeds does not use: generate these videos one at a time (batch size 1)")
        guidance = guidance_scale > 1.0
        embeddings = self._embeddings(prompt, prompt_embeds, negative_prompt, guidance)
        batch = embeddings.positive.shape[0]
        was_training = self.unet.training
        with self.rng_scope(generator):
            stream = draw_point(generator)
            sample = self.initial_noise((batch, 3, num_frames, height, width), stream, self.unet.dtype)
            self.unet.train(reference_dropout)
            try:
                frames = self.denoise_pixels(sample, embeddings.for_guidance(guidance), guidance_scale,
                                             num_inference_steps, generator=stream)
            finally:
                self.unet.train(was_training)
        self.maybe_free_model_hooks()
        frames = frames.clamp(-1, 1) if clamp_output else frames
        return VideoPipelineOutput(frames=frames) if return_dict else (frames,)
