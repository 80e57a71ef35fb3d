"""SR2, the latent "expert translation" stage: 29×256×160 → 29×576×320 by SDEdit in a zeroscope latent space.

Show-1 runs this stage with diffusers' `VideoToVideoSDPipeline` on `showlab/show-1-sr2` (a zeroscope_v2_576w
finetune): the SR1 frames are PIL-resized to the target size, VAE-encoded, noised to the timestep that `strength`
picks (0.8 of 50 DDIM steps, so t≈800 of 1000), and denoised for the remaining steps with classifier-free guidance
against the negative prompt "low resolution, blur". This module reproduces that sampler on diffusers' stock
`UNet3DConditionModel` and `AutoencoderKL` without importing the deprecated pipeline (a test compares the two).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from show1.pipelines.base import PromptEmbeddings, Show1StagePipeline, VideoPipelineOutput, load_scheduler
from show1.pipelines.seeding import DrawSource, RandomSource, draw_point

NEGATIVE_PROMPT = "low resolution, blur"  # what Show-1's run_inference.py passes to SR2

# scheduler/scheduler_config.json of the zeroscope v2 family (cerspense/zeroscope_v2_dark_30x448x256, exported by
# diffusers 0.17.0.dev0 like zeroscope_v2_576w, whose model_index.json names DDIMScheduler; the ModelScope config
# of zs2_576w says eps prediction, 1000 steps): SD's scaled-linear betas with "leading" spacing and steps_offset 1.
ZEROSCOPE_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
    "thresholding": False,
}


def paper_sr2_unet_config() -> dict[str, Any]:
    """The zeroscope_v2_576w UNet (and so show-1-sr2's, a finetune of it) as `UNet3DConditionModel` kwargs.

    Sources: the ModelScope config of the 576w weights (cerspense/zeroscope_v2_1111models, zs2_576w/
    configuration.json: unet_dim 320, dim_mult [1, 2, 4, 4], context_dim 1024, head_dim 64, res_blocks 2) and the
    diffusers unet/config.json of the same exporter for its siblings (cerspense/zeroscope_v1_320s,
    zeroscope_v2_XL: the block types and the values below). The 576w's own unet/config.json (34 lines, the same
    length as those) was listed but not readable in the stored corpus. Check: this config has 1,411,233,860
    parameters, i.e. 2.82 GB in fp16, the size of cerspense/zeroscope_v2_576w's unet/diffusion_pytorch_model.bin.
    """
    return {
        "sample_size": 32, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
        "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
        "cross_attention_dim": 1024, "attention_head_dim": 64,
    }


def paper_sr2_vae_config() -> dict[str, Any]:
    """The SD KL-f8 autoencoder that ModelScope/zeroscope use (`ckpt_autoencoder` in zs2_576w/configuration.json;
    the 576w vae/config.json has the 31 lines of SD's exported AutoencoderKL config), as `AutoencoderKL` kwargs.
    `sample_size` only matters for tiled decoding and was not confirmed for 576w. Check: 83,653,863 parameters,
    i.e. 167 MB in fp16, the size of the vae/diffusion_pytorch_model.bin of the zeroscope v2 repositories."""
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "block_out_channels": [128, 256, 512, 512], "act_fn": "silu", "sample_size": 512,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.18215,
    }


def tiny_sr2_components(text_dim: int, seed: int = 0) -> dict[str, Any]:
    """Randomly initialised `vae`, `unet` and `scheduler` small enough for CPU tests (latents at 1/8 resolution;
    the UNet attends to `text_dim`-wide text embeddings). The global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # An 8x VAE like SD's, and spatial attention only at the lower UNet level, so the tiny profile's
        # 29 frames at 576x320 (latents 72x40) stay cheap on a CPU. The VAE's full-resolution level is 8 channels
        # wide: at 32 its encode + decode of 29 frames took 48 s on one core, now 13 s.
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
        unet = UNet3DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(32, 64), down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
            up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"), cross_attention_dim=text_dim, attention_head_dim=8)
    return {"vae": vae.eval(), "unet": unet.eval(), "scheduler": DDIMScheduler(**ZEROSCOPE_SCHEDULER_CONFIG)}


def resize_like_pil(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (B, C, F, h, w) frames to (height, width) the way the reference's `PIL.Image.resize` does.

    PIL's default filter is bicubic with a = -0.5 and a support widened by the scale when shrinking, i.e. torch's
    `bicubic` with `antialias=True`; PIL resamples horizontally first and clips the intermediate image to the pixel
    range, so we do the same (that clipping is what differs on high-contrast detail). We stay in float: the
    reference's 8-bit round trip (uint8 before and after the resize) is skipped, so the result is within ~1/255 of
    PIL's, not bit-equal.
    """
    b, c, f, h, w = video.shape
    if (h, w) == (height, width):
        return video
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).float()
    if w != width:
        frames = F.interpolate(frames, size=(h, width), mode="bicubic", align_corners=False, antialias=True)
        frames = frames.clamp(-1, 1)
    if h != height:
        frames = F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        frames = frames.clamp(-1, 1)
    return frames.to(video.dtype).reshape(b, f, c, height, width).permute(0, 2, 1, 3, 4)


def _load_vae(folder: Path, dtype: torch.dtype | None) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)


def _load_unet(folder: Path, dtype: torch.dtype | None) -> UNet3DConditionModel:
    return UNet3DConditionModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)


class Show1SR2Pipeline(Show1StagePipeline):
    """Latent video-to-video super-resolution (SDEdit) with a zeroscope-layout `UNet3DConditionModel`."""

    loaders: ClassVar[dict[str, Callable[[Path, torch.dtype | None], Any]]] = {
        "vae": _load_vae, "unet": _load_unet, "scheduler": load_scheduler}
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae: AutoencoderKL, unet: UNet3DConditionModel, scheduler: Any,
                 tokenizer: Any | None = None, text_encoder: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def enable_vae_slicing(self) -> None:
        """Encode and decode one frame at a time (Show-1 turns this on for SR2: 29 frames at 576×320)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    # ------------------------------------------------------------------------------------------ checks

    def _check_inputs(self, video: Any, strength: float, num_inference_steps: int, height: int, width: int,
                      output_type: str) -> None:
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a (batch, 3, frames, height, width) tensor in [-1, 1], got {shape}")
        if min(video.shape) < 1 or not video.is_floating_point():
            raise ValueError(f"video must be a non-empty float tensor, got {tuple(video.shape)} {video.dtype}")
        if not torch.isfinite(video).all():
            raise ValueError("video contains NaN or infinite values")
        low, high = video.min().item(), video.max().item()
        if low < -1.5 or high > 1.5:  # a little overshoot from an unclamped earlier stage is fine; 0..255 is not
            raise ValueError(f"video values must lie in [-1, 1], got [{low:.3g}, {high:.3g}]: rescale the frames")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if int(num_inference_steps * strength) < 1:
            raise ValueError(f"strength {strength} × num_inference_steps {num_inference_steps} leaves no "
                             "denoising step: raise either")
        factor = self.vae_scale_factor
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size < factor or size % factor:
                raise ValueError(f"{name} must be a positive multiple of {factor} (the VAE's downsampling), "
                                 f"got {size!r}")
        if output_type not in ("pt", "np"):
            raise ValueError(f"output_type must be 'pt' or 'np', got {output_type!r}")

    # ---------------------------------------------------------------------------------------- sampling

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The last `int(num_inference_steps · strength)` timesteps of the schedule (img2img/SDEdit)."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps

    def prepare_latents(self, video: torch.Tensor, timestep: torch.Tensor, generator: DrawSource) -> torch.Tensor:
        """Encode (B, 3, F, H, W) frames to scaled VAE latents, sampled from the posterior, and noise them to
        `timestep`. Random draws come in the reference's order (posterior sample, then noise, both over the
        B·F frames), so a seeded generator gives the reference's latents. With one generator per video (a list),
        video i draws its F frames' posterior sample, then their noise, from its own: what it draws alone."""
        b, c, f, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).to(self._execution_device, self.vae.dtype)
        posterior = self.vae.encode(frames).latent_dist
        if isinstance(generator, list):
            if len(generator) != b:
                raise ValueError(f"{len(generator)} generators for {b} videos: pass one per video")
            shape, device = (f, *posterior.mean.shape[1:]), posterior.mean.device
            draws = [(randn_tensor(shape, generator=g, device=device, dtype=posterior.mean.dtype),
                      randn_tensor(shape, generator=g, device=device, dtype=self.unet.dtype)) for g in generator]
            latents = posterior.mean + posterior.std * torch.cat([sample for sample, _ in draws])
            latents = (self.vae.config.scaling_factor * latents).to(self.unet.dtype)
            noise = torch.cat([noise for _, noise in draws])
        else:
            latents = posterior.sample(generator)
            latents = (self.vae.config.scaling_factor * latents).to(self.unet.dtype)
            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        latents = self.scheduler.add_noise(latents, noise, timestep.repeat(b * f))
        return latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, F, h, w) latents → (B, 3, F, H, W) frames in [-1, 1]; one frame at a time with VAE slicing."""
        b, c, f, h, w = latents.shape
        latents = 1 / self.vae.config.scaling_factor * latents
        latents = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).to(self.vae.dtype)
        chunk = 1 if getattr(self.vae, "use_slicing", False) else b * f
        frames = torch.cat([self.vae.decode(part).sample for part in latents.split(chunk)])
        frames = frames.reshape(b, f, *frames.shape[1:]).permute(0, 2, 1, 3, 4)
        return frames.float().clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, prompt: str | list[str] | None = None,
                 prompt_embeds: PromptEmbeddings | None = None,
                 negative_prompt: str | list[str] | None = NEGATIVE_PROMPT, strength: float = 0.8,
                 num_inference_steps: int = 50, guidance_scale: float = 15.0, height: int = 320, width: int = 576,
                 generator: RandomSource = None, output_type: str = "pt",
                 return_dict: bool = True) -> VideoPipelineOutput | tuple[Any]:
        """Translate `video` (B, 3, F, h, w) in [-1, 1] to (B, 3, F, height, width).

        The frames are resized to (height, width) with PIL's resampling (`resize_like_pil`), encoded, noised to
        the timestep of `strength` and denoised for `int(num_inference_steps · strength)` steps with guidance
        `guidance_scale` (15.0: the reference leaves the pipeline default) against `negative_prompt`. Pass
        `prompt`, or `prompt_embeds` computed by this stage's text encoder (one prompt, or one per video).

        Returns `VideoPipelineOutput(frames)`: for `output_type="pt"` a float tensor (B, 3, F, height, width) in
        [-1, 1], for `"np"` a uint8 array (B, F, height, width, 3); a 1-tuple when `return_dict` is False.
        """
        self._check_inputs(video, strength, num_inference_steps, height, width, output_type)
        guidance = guidance_scale > 1.0
        embeddings = self._embeddings(prompt, prompt_embeds, negative_prompt, guidance)
        batch, width_expected = video.shape[0], self.unet.config.cross_attention_dim
        if embeddings.positive.shape[-1] != width_expected:  # e.g. the base stage's T5 embeddings passed along
            raise ValueError(f"prompt_embeds are {embeddings.positive.shape[-1]} wide but this UNet cross-attends "
                             f"to {width_expected}: compute them with this stage's encode_prompts")
        if embeddings.positive.shape[0] not in (1, batch):
            raise ValueError(f"prompt gives {embeddings.positive.shape[0]} embeddings for {batch} videos: "
                             "pass one prompt, or one per video")
        text = embeddings.for_guidance(guidance)
        if embeddings.positive.shape[0] != batch:  # one prompt for every video: (uncond, cond) → B each
            text = text.repeat_interleave(batch, dim=0)

        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        with self.rng_scope(generator):
            stream = draw_point(generator)
            latents = self.prepare_latents(resize_like_pil(video.clamp(-1, 1), height, width), timesteps[:1], stream)
            step_kwargs = self._step_kwargs(stream)
            with self.progress_bar(total=len(timesteps)) as bar:
                for t in timesteps:
                    model_input = torch.cat([latents] * 2) if guidance else latents
                    model_input = self.scheduler.scale_model_input(model_input, t)
                    noise_pred = self.unet(model_input, t, encoder_hidden_states=text, return_dict=False)[0]
                    if guidance:
                        uncond, cond = noise_pred.chunk(2)
                        noise_pred = uncond + guidance_scale * (cond - uncond)
                    latents = self._step_frames(noise_pred, t, latents, step_kwargs)
                    bar.update()

        frames = self.decode_latents(latents)
        self.maybe_free_model_hooks()
        if output_type == "np":
            frames = ((frames * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
            frames = np.ascontiguousarray(frames)
        if not return_dict:
            return (frames,)
        return VideoPipelineOutput(frames=frames)
