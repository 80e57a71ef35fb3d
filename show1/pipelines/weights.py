"""`show1 init-weights`: randomly initialised stage folders in the layout of the published checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
from diffusers.utils import logging as diffusers_logging

from show1 import atomic, integrity
from show1.models.configs import (
    STAGE_FOLDERS,
    STAGES,
    T5_XXL_DIM,
    image_noising_scheduler_config,
    pixel_scheduler_config,
    pixel_unet_config,
    scheduler_from_config,
)
from show1.models.text import load_text_encoder, tiny_text_encoder_dir
from show1.models.unet_3d_condition import ShowOneUNet3DConditionModel
from show1.pipelines.cascade import STAGE_PIPELINES, check_stages
from show1.pipelines.sr2 import (
    ZEROSCOPE_SCHEDULER_CONFIG,
    paper_sr2_unet_config,
    paper_sr2_vae_config,
    tiny_sr2_components,
)


def assemble_stage(stage: str, unet: Any, vae: Any = None, tokenizer: Any = None, text_encoder: Any = None) -> Any:
    """The stage's pipeline around `unet` with the published samplers (and sr2's VAE): one place for the
    random-weight builder, the trainer's checkpoints and exports, and its sample videos."""
    if stage == "sr2":
        parts: dict[str, Any] = {"unet": unet, "vae": vae, "scheduler": DDIMScheduler(**ZEROSCOPE_SCHEDULER_CONFIG)}
    else:
        parts = {"unet": unet, "scheduler": scheduler_from_config(pixel_scheduler_config())}
    if stage == "sr1":
        parts["image_noising_scheduler"] = scheduler_from_config(image_noising_scheduler_config())
    return STAGE_PIPELINES[stage](**parts, tokenizer=tokenizer, text_encoder=text_encoder)


def build_stage(stage: str, profile: str, text_dim: int, text: tuple | None = None, device: Any = None,
                dtype: torch.dtype | None = None) -> Any:
    """A randomly initialised stage pipeline of `profile` size; `text` = (tokenizer, encoder) or None. The models
    are built on `device` (a GPU: no host copy of paper-size weights) in `dtype`; the schedulers always on the CPU
    (DPM-Solver's `set_timesteps` fails on scheduler tensors left on a GPU)."""
    tokenizer, encoder = text or (None, None)
    with torch.device(device or "cpu"):
        if stage == "sr2":
            if profile == "tiny":
                parts = tiny_sr2_components(text_dim=text_dim)
            else:
                parts = {"vae": AutoencoderKL(**paper_sr2_vae_config()),
                         "unet": UNet3DConditionModel(**paper_sr2_unet_config())}
        else:
            parts = {"unet": ShowOneUNet3DConditionModel.from_config(pixel_unet_config(stage, profile, text_dim)),
                     "vae": None}
    if dtype is not None:
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its note on modules to keep in float32 (none here) on every cast
        try:
            parts = {name: p.to(dtype) if isinstance(p, torch.nn.Module) else p for name, p in parts.items()}
        finally:
            diffusers_logging.set_verbosity(level)
    return assemble_stage(stage, parts["unet"], parts["vae"], tokenizer, encoder)


def init_weights(out: Path | str, profile: str = "tiny", stages: list[str] | tuple[str, ...] = STAGES,
                 text_encoder_dir: Path | str | None = None, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write `out/show-1-base`, … with random weights (safetensors) for `profile`.

    The base stage gets the text encoder (tiny: the packaged MiniLM, in float32; paper: `text_encoder_dir`, e.g.
    a local T5-XXL, else a random T5-XXL-shaped encoder with a locally trained tokenizer) and the pixel stages
    share its embeddings, so they are written without one. The paper sr2 gets a random OpenCLIP-H-shaped text
    encoder of its own (1024-d, what its cross-attention takes). Paper weights are stored in bfloat16 (~10 B
    parameters with T5-XXL: ~20 GB).
    """
    out = Path(out)
    stages = check_stages(stages)
    if profile not in ("tiny", "paper"):
        raise ValueError(f"unknown profile '{profile}' (tiny | paper)")
    existing = [STAGE_FOLDERS[s] for s in stages if (out / STAGE_FOLDERS[s]).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out}: {', '.join(existing)} already exist (pass --overwrite to replace them)")
    dtype = torch.bfloat16 if profile == "paper" else None
    if text_encoder_dir is None and profile == "tiny":
        text_encoder_dir = tiny_text_encoder_dir()
    texts: dict[str, tuple] = {}
    if text_encoder_dir is not None:
        texts["base"] = load_text_encoder(text_encoder_dir, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if profile == "paper":  # random encoders, seeded like the stages
            from show1.models.random_text import random_text_encoder

            if "base" in stages and "base" not in texts:
                texts["base"] = random_text_encoder("t5", dtype)
            if "sr2" in stages:
                texts["sr2"] = random_text_encoder("clip", dtype)
        text_dim = texts["base"][1].config.hidden_size if "base" in texts else T5_XXL_DIM
        out.mkdir(parents=True, exist_ok=True)
        written = {}
        for stage in stages:
            pipe = build_stage(stage, profile, text_dim, texts.get(stage), dtype=dtype)
            target = out / STAGE_FOLDERS[stage]
            with atomic.folder_in_place(target) as staging:  # the stage folder appears whole or not at all
                pipe.save_pretrained(staging, safe_serialization=True)
                integrity.seal(staging)
            written[stage] = target
    return written
