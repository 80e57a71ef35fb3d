"""What every stage pipeline shares: loading a stage folder, prompt embeddings, seeding, the pixel
denoising loop (IF-style ε + learned variance with classifier-free guidance), and video outputs.

A stage folder has the layout of the published Show-1 checkpoints (`model_index.json`, `unet/`,
`scheduler/`, `text_encoder/`, `tokenizer/`, …). Components are loaded by name with show1's classes, so the
published `model_index.json` entries (`showone.models.unet_3d_condition`) map to our UNet without importing
anything they name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from show1.models.text import MAX_LENGTH, encode_prompt, load_text_encoder, reference_text
from show1.models.unet_3d_condition import ShowOneUNet3DConditionModel
from show1.pipelines.seeding import DrawSource, RandomSource, rng_scope
from show1.weight_files import MissingComponentError, check_folder


@dataclass
class VideoPipelineOutput(BaseOutput):
    """`frames`: (batch, 3, frames, height, width) in [-1, 1]."""

    frames: torch.Tensor


@dataclass(frozen=True)
class PromptEmbeddings:
    """Text embeddings computed once and reused by every stage that shares the text encoder."""

    positive: torch.Tensor
    negative: torch.Tensor | None

    def for_guidance(self, guidance: bool) -> torch.Tensor:
        if not guidance:
            return self.positive
        if self.negative is None:
            raise ValueError("classifier-free guidance needs negative prompt embeddings")
        return torch.cat([self.negative, self.positive])


# DPM-Solver's last step. The published checkpoints were sampled with diffusers 0.19, whose last step ends on the
# last timestep's sigma; newer diffusers default to stepping to sigma 0 ("zero"), which changes the final sample.
PUBLISHED_FINAL_SIGMAS = "sigma_min"


def load_scheduler(folder: Path, dtype: torch.dtype | None) -> Any:
    """A scheduler folder. A DPM-Solver config written before diffusers knew `final_sigmas_type` (the published
    Show-1 folders) keeps the last step it was sampled with (PUBLISHED_FINAL_SIGMAS)."""
    config = json.loads((folder / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise ValueError(f"{folder}: unknown scheduler class {config.get('_class_name')!r}")
    if cls is diffusers.DPMSolverMultistepScheduler and "final_sigmas_type" not in config:
        return cls.from_pretrained(folder, final_sigmas_type=PUBLISHED_FINAL_SIGMAS)
    return cls.from_pretrained(folder)


def with_final_sigmas(scheduler: Any, final_sigmas_type: str) -> Any:
    """`scheduler` with DPM-Solver's last step set (`sigma_min` | `zero`); other schedulers are returned as they are."""
    if "final_sigmas_type" not in scheduler.config or scheduler.config.final_sigmas_type == final_sigmas_type:
        return scheduler
    return type(scheduler).from_config(scheduler.config, final_sigmas_type=final_sigmas_type)


def _load_unet(folder: Path, dtype: torch.dtype | None) -> ShowOneUNet3DConditionModel:
    return ShowOneUNet3DConditionModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)


class Show1StagePipeline(DiffusionPipeline):
    """Base of the four stage pipelines. Subclasses declare `required`/`optional` component loaders."""

    # component name -> loader(folder, dtype); text encoder/tokenizer are loaded together
    loaders: ClassVar[dict[str, Callable[[Path, torch.dtype | None], Any]]] = {
        "unet": _load_unet, "scheduler": load_scheduler}
    text_optional: ClassVar[bool] = True
    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components: ClassVar[list[str]] = ["tokenizer", "text_encoder"]

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None,
                        load_text_encoder_: bool = True, **_: Any) -> Show1StagePipeline:
        """Load a stage folder (ours or a published Show-1 one). `load_text_encoder_=False` skips the text
        encoder, for stages that reuse another stage's prompt embeddings."""
        folder = Path(folder)
        if not (folder / "model_index.json").is_file():
            raise MissingComponentError(f"{folder}: no model_index.json, so not a pipeline folder")
        for name in cls.loaders:
            if not (folder / name).is_dir():
                raise MissingComponentError(f"{folder}: missing component '{name}/' needed by {cls.__name__}")
        text = ["text_encoder", "tokenizer"] if load_text_encoder_ else []
        check_folder(folder, parts=[*cls.loaders, *text])  # safetensors only; what is loaded must match its seal
        components: dict[str, Any] = {name: loader(folder / name, torch_dtype) for name, loader in cls.loaders.items()}
        components["tokenizer"], components["text_encoder"] = None, None
        if load_text_encoder_ and (folder / "text_encoder").is_dir():
            components["tokenizer"], components["text_encoder"] = load_text_encoder(folder, torch_dtype)
        elif load_text_encoder_ and not cls.text_optional:
            raise MissingComponentError(f"{folder}: missing component 'text_encoder/'")
        return cls(**components)

    # ----------------------------------------------------------------------------------------- prompts

    def encode_prompts(self, prompt: str | list[str], negative_prompt: str | list[str] | None = "",
                       guidance: bool = True, device: torch.device | None = None,
                       lowercase: bool = True) -> PromptEmbeddings:
        """Embed the prompts with this stage's text encoder (the empty prompt is the negative, as in Show-1).
        `lowercase`: strip and lowercase them first, as the reference does before T5 (`sampling.lowercase_prompts`)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not p or not p.strip() for p in prompts):
            raise ValueError("the prompt is empty: describe the video to generate")
        if lowercase:
            prompts = [reference_text(p) for p in prompts]
            if negative_prompt is not None:
                negative_prompt = reference_text(negative_prompt) if isinstance(negative_prompt, str) \
                    else [reference_text(p) for p in negative_prompt]
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} was loaded without a text encoder: pass prompt_embeds")
        device = device or self._execution_device
        dtype = self.unet.dtype
        positive = encode_prompt(self.tokenizer, self.text_encoder, prompts, MAX_LENGTH, device, dtype)
        negative = None
        if guidance:
            negatives = [negative_prompt or ""] * len(prompts) if not isinstance(negative_prompt, list) \
                else negative_prompt
            negative = encode_prompt(self.tokenizer, self.text_encoder, negatives, MAX_LENGTH, device, dtype)
        return PromptEmbeddings(positive, negative)

    def _embeddings(self, prompt: str | list[str] | None, embeddings: PromptEmbeddings | None,
                    negative_prompt: str | list[str] | None, guidance: bool) -> PromptEmbeddings:
        if embeddings is not None:
            device, dtype = self._execution_device, self.unet.dtype
            return PromptEmbeddings(embeddings.positive.to(device, dtype),
                                    None if embeddings.negative is None else embeddings.negative.to(device, dtype))
        if prompt is None:
            raise ValueError("pass a prompt or prompt embeddings")
        return self.encode_prompts(prompt, negative_prompt, guidance)

    def _video_and_text(self, video: torch.Tensor, min_frames: int, prompt: str | list[str] | None,
                        embeddings: PromptEmbeddings | None, negative_prompt: str | list[str] | None,
                        guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a video input (B, 3, F, H, W), move it to the UNet, and get the guidance text embeddings."""
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[2] < min_frames:
            raise ValueError(f"video must be (batch, 3, frames>={min_frames}, height, width), got {tuple(video.shape)}")
        guidance = guidance_scale > 1.0
        text = self._embeddings(prompt, embeddings, negative_prompt, guidance).for_guidance(guidance)
        return video.to(self._execution_device, self.unet.dtype), text

    # -------------------------------------------------------------------------------------- denoising

    def rng_scope(self, source: RandomSource) -> Any:
        """Around a stage run: reseeding (the reference's) leaves the caller's global random state as it was."""
        return rng_scope(source, self._execution_device)

    def noise(self, shape: tuple[int, ...], generator: DrawSource,
              dtype: torch.dtype) -> torch.Tensor:
        """Standard normal noise drawn from `generator` (on the CPU when the generator is, then moved)."""
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)

    def initial_noise(self, shape: tuple[int, ...], generator: DrawSource,
                      dtype: torch.dtype) -> torch.Tensor:
        """The starting sample of a denoising loop, scaled as the scheduler wants."""
        return self.noise(shape, generator, dtype) * self.scheduler.init_noise_sigma

    def denoise_pixels(self, sample: torch.Tensor, embeddings: torch.Tensor, guidance_scale: float,
                       num_inference_steps: int, condition: torch.Tensor | None = None,
                       class_labels: torch.Tensor | None = None, generator: DrawSource = None,
                       cross_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """The IF-style loop of every pixel stage.

        `sample` (B, 3, F, H, W) is denoised; `condition` (B, C, F, H, W) is concatenated to the UNet input
        at every step; the UNet predicts ε and a learned variance (6 channels). Under guidance the variance
        comes from the text branch; the scheduler steps on the frames as a batch of images, so dynamic
        thresholding works per frame, as in the reference.
        """
        guidance = guidance_scale > 1.0
        self.scheduler.set_timesteps(num_inference_steps, device=sample.device)
        timesteps = self.scheduler.timesteps
        if class_labels is not None and guidance:
            class_labels = torch.cat([class_labels] * 2)
        channels = sample.shape[1]
        step_kwargs = self._step_kwargs(generator)
        with self.progress_bar(total=len(timesteps)) as bar:
            for t in timesteps:
                model_input = sample if condition is None else torch.cat([sample, condition], dim=1)
                model_input = torch.cat([model_input] * 2) if guidance else model_input
                model_input = self.scheduler.scale_model_input(model_input, t)
                prediction = self.unet(model_input, t, encoder_hidden_states=embeddings, class_labels=class_labels,
                                       cross_attention_kwargs=cross_attention_kwargs).sample
                if guidance:
                    uncond, text = prediction.chunk(2)
                    eps_uncond, eps_text = uncond[:, :channels], text[:, :channels]
                    prediction = torch.cat([eps_uncond + guidance_scale * (eps_text - eps_uncond),
                                            text[:, channels:]], dim=1)
                if self.scheduler.config.get("variance_type") not in ("learned", "learned_range"):
                    prediction = prediction[:, :channels]
                sample = self._step_frames(prediction, t, sample, step_kwargs)
                bar.update()
        return sample

    def _step_frames(self, prediction: torch.Tensor, t: torch.Tensor, sample: torch.Tensor,
                     step_kwargs: dict[str, Any]) -> torch.Tensor:
        b, c, f, h, w = sample.shape
        frames = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        prediction = prediction.permute(0, 2, 1, 3, 4).reshape(b * f, -1, h, w)
        frames = self.scheduler.step(prediction, t, frames, **step_kwargs).prev_sample
        return frames.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

    def _step_kwargs(self, generator: DrawSource) -> dict[str, Any]:
        """The generator for the scheduler's step, when it takes one. Per-video generators (a batch) go nowhere: the
        step sees the frames of every video as one batch of images, so a step that draws noise is refused."""
        import inspect

        accepted = set(inspect.signature(self.scheduler.step).parameters)
        if isinstance(generator, list):
            if step_draws_noise(self.scheduler):
                raise ValueError(f"{type(self.scheduler).__name__} ({self.scheduler.config.get('algorithm_type', '')})"
                                 " draws noise at every step: generate these videos one at a time (batch size 1)")
            return {}
        return {"generator": generator} if "generator" in accepted else {}


def step_draws_noise(scheduler: Any) -> bool:
    """Whether `scheduler.step` draws random noise: the SDE variants of DPM-Solver and DDPM-like ancestral samplers
    do; DPM-Solver(++) and DDIM (eta 0, as show1 runs it) do not."""
    name = type(scheduler).__name__
    if name.startswith("DPMSolver"):
        return str(scheduler.config.get("algorithm_type", "")).startswith("sde")
    return name not in ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
                        "UniPCMultistepScheduler")
