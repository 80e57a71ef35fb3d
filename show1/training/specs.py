"""Per-stage training specs: how a batch of curated clips becomes a denoising problem.

Each spec returns the clean target `x0` (B, 3, F, H, W), the condition concatenated to the UNet input (or
None) and the class labels (sr1's noise level, or None). `draw_batch` builds a batch clip by clip, every draw of a
clip from that clip's own generator (show1.training.ranks.item_generator), so a resumed run draws exactly what an
uninterrupted one would, and N processes draw what one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from show1.config import Train
from show1.pipelines.interpolation import SEGMENT, interpolation_condition

KEYFRAME_STRIDE = SEGMENT - 1  # keyframes sit every 4th frame of the 29-frame clip: 0, 4, …, 28
SR1_WINDOW = 8
SR_FACTOR = 4  # 64×40 → 256×160


@dataclass(frozen=True)
class StageBatch:
    x0: torch.Tensor
    condition: torch.Tensor | None
    class_labels: torch.Tensor | None


def _channels_first(frames: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) from the dataset → (B, 3, F, H, W) for the UNet."""
    return frames.permute(0, 2, 1, 3, 4)


def base_batch(frames: torch.Tensor, generator: torch.Generator, cfg: Train, noising: Any) -> StageBatch:
    """Text → keyframes: every 4th frame of the clip (8 of 29), as the cascade places them."""
    return StageBatch(_channels_first(frames)[:, :, ::KEYFRAME_STRIDE], None, None)


def interp_batch(frames: torch.Tensor, generator: torch.Generator, cfg: Train, noising: Any) -> StageBatch:
    """A 5-frame window between two keyframes; its ends, blended, are the condition (plus the mask)."""
    video = _channels_first(frames)
    starts = torch.arange(0, video.shape[2] - SEGMENT + 1, KEYFRAME_STRIDE)
    start = int(starts[torch.randint(len(starts), (1,), generator=generator)])
    x0 = video[:, :, start:start + SEGMENT]
    return StageBatch(x0, interpolation_condition(x0[:, :, [0, -1]]), None)


def sr1_batch(frames: torch.Tensor, generator: torch.Generator, cfg: Train, noising: Any) -> StageBatch:
    """An 8-frame high-res window; the condition is its ×4 downsample, upsampled back and noised to a random
    level in [0, sr1_noise_level_max], which is also the class label (noise augmentation, as IF-II)."""
    video = _channels_first(frames)
    b, c, f, h, w = video.shape
    start = int(torch.randint(max(f - SR1_WINDOW, 0) + 1, (1,), generator=generator))
    x0 = video[:, :, start:start + SR1_WINDOW]
    frames_2d = x0.permute(0, 2, 1, 3, 4).reshape(-1, c, h, w)
    low = F.interpolate(frames_2d, (h // SR_FACTOR, w // SR_FACTOR), mode="area")
    up = F.interpolate(low, (h, w), mode="bilinear", align_corners=True)
    up = up.reshape(b, -1, c, h, w).permute(0, 2, 1, 3, 4)
    levels = torch.randint(cfg.sr1_noise_level_max + 1, (b,), generator=generator)
    noise = torch.randn(up.shape, generator=generator)
    return StageBatch(x0, noising.add_noise(up, noise, levels), levels)


def sr2_batch(frames: torch.Tensor, generator: torch.Generator, cfg: Train, vae: Any) -> StageBatch:
    """Expert translation: an 8-frame window of the largest curated size, as scaled VAE latents (frozen VAE).
    The stage is plain latent video diffusion; what makes it a translator is the 0–900 timestep range."""
    video = _channels_first(frames)
    b, c, f, h, w = video.shape
    start = int(torch.randint(max(f - SR1_WINDOW, 0) + 1, (1,), generator=generator))
    clip = video[:, :, start:start + SR1_WINDOW]
    flat = clip.permute(0, 2, 1, 3, 4).reshape(-1, c, h, w).to(vae.device, vae.dtype)
    with torch.no_grad():
        latents = vae.encode(flat).latent_dist.sample(generator) * vae.config.scaling_factor
    latents = latents.float().cpu().reshape(b, -1, *latents.shape[1:]).permute(0, 2, 1, 3, 4)
    return StageBatch(latents, None, None)


@dataclass(frozen=True)
class StageSpec:
    """What the trainer needs to know about a stage, in one place (instead of `if stage == …` in the loop)."""

    build: Callable[[torch.Tensor, torch.Generator, Train, Any], StageBatch]  # clips → target, condition, labels
    size: Literal["smallest", "largest"]  # the curated size it trains on: low-res stages / the high-res target
    latent: bool = False  # trains on a frozen VAE's latents (the auxiliary is the VAE), else on pixels (the
    #                       auxiliary is IF-II's image-noising schedule, which sr1 noises its condition with)
    expert_translation: bool = False  # timesteps 0 … train.sr2_max_timestep − 1 only (Show-1's sr2)

    def max_timestep(self, cfg: Train, schedule: Any) -> int:
        return cfg.sr2_max_timestep if self.expert_translation else schedule.config.num_train_timesteps


SPECS = {
    "base": StageSpec(base_batch, "smallest"),
    "interp": StageSpec(interp_batch, "smallest"),
    "sr1": StageSpec(sr1_batch, "largest"),
    "sr2": StageSpec(sr2_batch, "largest", latent=True, expert_translation=True),
}


def training_timesteps(stage: str, cfg: Train, schedule: Any, count: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform training timesteps; sr2 (expert translation) only sees 0 … sr2_max_timestep − 1."""
    return torch.randint(SPECS[stage].max_timestep(cfg, schedule), (count,), generator=generator)


@dataclass(frozen=True)
class DenoisingBatch:
    """A batch ready for the UNet: the noised target (with its condition), the noise to predict and the rest."""

    x0: torch.Tensor
    noisy: torch.Tensor
    model_input: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    class_labels: torch.Tensor | None
    dropped: torch.Tensor  # (B,) bool: captions replaced by the empty prompt (classifier-free guidance)


def draw_batch(stage: str, clips: list[torch.Tensor], generators: list[torch.Generator], cfg: Train,
               noise_schedule: Any, auxiliary: Any) -> DenoisingBatch:
    """Clips (each (F, 3, H, W)) → a denoising batch; clip i draws its window, condition noise, caption dropout,
    noise and timestep, in that order, from generators[i]."""
    parts: list[tuple[StageBatch, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for frames, generator in zip(clips, generators, strict=True):
        item = SPECS[stage].build(frames[None], generator, cfg, auxiliary)
        dropped = torch.rand(1, generator=generator) < cfg.caption_dropout
        noise = torch.randn(item.x0.shape, generator=generator)
        timesteps = training_timesteps(stage, cfg, noise_schedule, 1, generator)
        parts.append((item, dropped, noise, timesteps))
    x0 = torch.cat([p[0].x0 for p in parts])
    noise, timesteps = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
    noisy = noise_schedule.add_noise(x0, noise, timesteps)
    conditions = [p[0].condition for p in parts]
    model_input = noisy if conditions[0] is None else torch.cat([noisy, torch.cat(conditions)], dim=1)
    labels = [p[0].class_labels for p in parts]
    return DenoisingBatch(x0, noisy, model_input, noise, timesteps,
                          None if labels[0] is None else torch.cat(labels), torch.cat([p[1] for p in parts]))


def training_size(stage: str, resolutions: list[str]) -> str:
    """The curated size a stage trains on: the smallest for base/interp, the largest (the high-res target)
    for sr1 and sr2 (64x40 and 256x160 with the tiny curation; the paper profile adds 576x320 for sr2)."""
    by_area = sorted(resolutions, key=lambda key: int(key.split("x")[0]) * int(key.split("x")[1]))
    return by_area[-1] if SPECS[stage].size == "largest" else by_area[0]
