"""The stage registry: UNet and scheduler configurations of every stage, for the `paper` and `tiny` profiles.

Paper sizes are the published Show-1 configs (`showlab/show-1-*/unet/config.json`; interp = base with 7
input channels; see ../shared/SHOW1.md). Tiny sizes run on two CPU cores in seconds and keep every
structural feature of the paper ones (block kinds, text path, class embedding for sr1).
"""

from __future__ import annotations

from typing import Any

STAGES = ("base", "interp", "sr1", "sr2")
PIXEL_STAGES = ("base", "interp", "sr1")
# Folder names of the published checkpoints (and of `show1 init-weights`).
STAGE_FOLDERS = {"base": "show-1-base", "interp": "show-1-interpolation", "sr1": "show-1-sr1", "sr2": "show-1-sr2"}
T5_XXL_DIM = 4096
INPUT_CHANNELS = {"base": 3, "interp": 7, "sr1": 6}  # noisy frames (+ blended ends + mask | + noised upsample)
# The component folders each stage's pipeline loads (besides the optional tokenizer/ and text_encoder/): what a
# stage folder must hold. Read without importing the pipelines (show1 register checks folders with it); a test
# checks it against the pipelines' loaders.
# sr1's first-frame model (DeepFloyd IF-II-L, pipelines/first_frame.py): the parts show1 loads of its folder, and
# where a registered sr1 version keeps them (with its model_index.json), inside its stage folder.
FIRST_FRAME_COMPONENTS = ("unet", "scheduler", "image_noising_scheduler")
FIRST_FRAME_FOLDER = "first_frame"
STAGE_COMPONENTS = {"base": ("unet", "scheduler"), "interp": ("unet", "scheduler"),
                    "sr1": ("unet", "scheduler", "image_noising_scheduler"), "sr2": ("unet", "scheduler", "vae")}

_IF_I = {  # show-1-base/unet/config.json
    "act_fn": "gelu", "addition_embed_type": "text", "addition_embed_type_num_heads": 64,
    "attention_head_dim": 64, "block_out_channels": [320, 640, 960, 1280], "cross_attention_dim": 1280,
    "cross_attention_norm": "group_norm",
    "down_block_types": ["ResnetDownsampleBlock3D"] + ["SimpleCrossAttnDownBlock3D"] * 3,
    "up_block_types": ["SimpleCrossAttnUpBlock3D"] * 3 + ["ResnetUpsampleBlock3D"],
    "mid_block_type": "UNetMidBlock3DSimpleCrossAttn", "encoder_hid_dim": T5_XXL_DIM,
    "encoder_hid_dim_type": "text_proj", "layers_per_block": 3, "norm_num_groups": 32, "out_channels": 6,
    "resnet_time_scale_shift": "scale_shift", "sample_size": 64, "transfromer_in_opt": False,
}
_IF_II = {  # show-1-sr1/unet/config.json
    **_IF_I, "block_out_channels": [128, 256, 512, 768, 768], "class_embed_type": "timestep",
    "cross_attention_dim": 768, "layers_per_block": [2, 2, 3, 4, 2],
    "down_block_types": ["ResnetDownsampleBlock3D"] * 3 + ["SimpleCrossAttnDownBlock3D"] * 2,
    "up_block_types": ["SimpleCrossAttnUpBlock3D"] * 2 + ["ResnetUpsampleBlock3D"] * 3,
    "mid_block_scale_factor": 1.4142271248762552, "resnet_out_scale_factor": 1.4142271248762552,
    "resnet_skip_time_act": True, "time_embedding_act_fn": "gelu", "sample_size": 256,
}
# Three levels so spatial attention runs at 1/4 of 64x40 (16x10), as IF-I's runs at low resolutions only. With
# attention at 1/2 (two levels) a training step of base (batch 2, 8 frames) took 3.6x as long on the CPU
# (2.83 s against 0.78 s; forward alone 0.87 s against 0.33 s).
_TINY = {
    "act_fn": "gelu", "addition_embed_type": "text", "addition_embed_type_num_heads": 2, "attention_head_dim": 8,
    "block_out_channels": [32, 32, 64], "cross_attention_dim": 32, "cross_attention_norm": "group_norm",
    "down_block_types": ["ResnetDownsampleBlock3D"] * 2 + ["SimpleCrossAttnDownBlock3D"],
    "up_block_types": ["SimpleCrossAttnUpBlock3D"] + ["ResnetUpsampleBlock3D"] * 2,
    "mid_block_type": "UNetMidBlock3DSimpleCrossAttn", "encoder_hid_dim_type": "text_proj",
    "layers_per_block": 1, "norm_num_groups": 8, "out_channels": 6, "resnet_time_scale_shift": "scale_shift",
    "transfromer_in_opt": False,
}
_TINY_SR = {  # four levels so spatial attention runs at 1/8 of 256x160, as the paper's does at 1/8 and 1/16
    **_TINY, "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["ResnetDownsampleBlock3D"] * 3 + ["SimpleCrossAttnDownBlock3D"],
    "up_block_types": ["SimpleCrossAttnUpBlock3D"] + ["ResnetUpsampleBlock3D"] * 3, "class_embed_type": "timestep",
    "mid_block_scale_factor": 1.4142271248762552,
    "resnet_out_scale_factor": 1.4142271248762552, "resnet_skip_time_act": True, "time_embedding_act_fn": "gelu",
}


def pixel_unet_config(stage: str, profile: str, text_dim: int | None = None) -> dict[str, Any]:
    """The `ShowOneUNet3DConditionModel` config of a pixel stage. `text_dim` overrides the text width."""
    if stage not in PIXEL_STAGES:
        raise ValueError(f"'{stage}' is not a pixel stage ({', '.join(PIXEL_STAGES)})")
    if profile == "paper":
        config = dict(_IF_II if stage == "sr1" else _IF_I)
    elif profile == "tiny":
        config = dict(_TINY_SR if stage == "sr1" else _TINY, sample_size=160 if stage == "sr1" else 40)
    else:
        raise ValueError(f"unknown profile '{profile}' (tiny | paper)")
    config["in_channels"] = INPUT_CHANNELS[stage]
    config["encoder_hid_dim"] = text_dim or (T5_XXL_DIM if profile == "paper" else 32)
    return config


def pixel_scheduler_config() -> dict[str, Any]:
    """The published samplers of the pixel stages (DPM-Solver++ with IF's dynamic thresholding)."""
    return {
        "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
        "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5,
        "lambda_min_clipped": -5.1, "timestep_spacing": "linspace", "solver_order": 2,
        "variance_type": "learned_range", "lower_order_final": True,
        "final_sigmas_type": "sigma_min",  # the last step of diffusers 0.19, which sampled the published videos
    }


def scheduler_from_config(config: dict[str, Any]) -> Any:
    """A diffusers scheduler from a config dict that names its class (`_class_name`)."""
    import diffusers

    config = dict(config)
    name = config.pop("_class_name")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"unknown scheduler class {name!r}")
    return cls.from_config(config)


def image_noising_scheduler_config() -> dict[str, Any]:
    """sr1's noise augmentation of the upsampled condition (IF-II's DDPM image-noising scheduler)."""
    return {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000,
            "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0}


# The published per-stage inference settings (run_inference.py): steps, guidance and, for sr1, the noise level.
DEFAULTS: dict[str, dict[str, Any]] = {
    "base": {"num_inference_steps": 75, "guidance_scale": 9.0},
    "interp": {"num_inference_steps": 75, "guidance_scale": 4.0},
    "sr1": {"num_inference_steps": 125, "guidance_scale": 7.0, "noise_level": 250},
    "sr2": {"num_inference_steps": 50, "guidance_scale": 15.0, "strength": 0.8},
}
