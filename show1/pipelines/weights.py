"""`show1 init-weights`: randomly initialised stage folders in the layout of the published checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel

from show1 import atomic, integrity
from show1.models.configs import (
    STAGE_FOLDERS,
    STAGES,
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


def build_stage(stage: str, profile: str, text_dim: int, text: tuple | None = None) -> Any:
    """A randomly initialised stage pipeline of `profile` size; `text` = (tokenizer, encoder) or None."""
    tokenizer, encoder = text or (None, None)
    if stage == "sr2":
        if profile == "tiny":
            parts = tiny_sr2_components(text_dim=text_dim)
        else:
            parts = {"vae": AutoencoderKL(**paper_sr2_vae_config()),
                     "unet": UNet3DConditionModel(**paper_sr2_unet_config())}
        return assemble_stage(stage, parts["unet"], parts["vae"], tokenizer, encoder)
    unet = ShowOneUNet3DConditionModel.from_config(pixel_unet_config(stage, profile, text_dim))
    return assemble_stage(stage, unet, None, tokenizer, encoder)


def init_weights(out: Path | str, profile: str = "tiny", stages: list[str] | tuple[str, ...] = STAGES,
                 text_encoder_dir: Path | str | None = None, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write `out/show-1-base`, … with random weights (safetensors) for `profile`.

    The base stage gets the text encoder (tiny: the packaged MiniLM; paper: `text_encoder_dir`, e.g. a
    local T5-XXL) and the other stages share its embeddings, so they are written without one; for the paper
    sizes sr2's OpenCLIP text encoder is not created (give the published folder for real weights).
    """
    out = Path(out)
    stages = check_stages(stages)
    if profile not in ("tiny", "paper"):
        raise ValueError(f"unknown profile '{profile}' (tiny | paper)")
    if text_encoder_dir is None and profile == "tiny":
        text_encoder_dir = tiny_text_encoder_dir()
    text = load_text_encoder(text_encoder_dir) if text_encoder_dir is not None else None
    text_dim = text[1].config.hidden_size if text else 4096
    existing = [STAGE_FOLDERS[s] for s in stages if (out / STAGE_FOLDERS[s]).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out}: {', '.join(existing)} already exist (pass --overwrite to replace them)")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for stage in stages:
            pipe = build_stage(stage, profile, text_dim, text if stage == "base" else None)
            target = out / STAGE_FOLDERS[stage]
            with atomic.folder_in_place(target) as staging:  # the stage folder appears whole or not at all
                pipe.save_pretrained(staging, safe_serialization=True)
                integrity.seal(staging)
            written[stage] = target
    return written
