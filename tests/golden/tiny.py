"""The tiny, seeded inputs that the reference goldens were recorded with and the golden tests rebuild: UNet weights
drawn from a seeded CPU generator (every tensor, so no zero-initialised layer hides a path), prompt embeddings, and
the published sampler config. Shared by make_reference_goldens.py (run against the reference's code) and
tests/test_golden.py (run against show1's)."""

from __future__ import annotations

from typing import Any

import torch

from show1.models.configs import image_noising_scheduler_config, pixel_scheduler_config, pixel_unet_config

SEED = 345  # run_inference.py's seed
# Recorded and compared with one CPU thread: float sums then run in one order (with 2 threads they moved by 1.7e-5).
# Other CPU kernels (AVX-512 instead of AVX2) or another torch round differently: recording_facts() names what the
# goldens were recorded with, and the tests hold a looser bound where those differ.


def recording_facts() -> dict[str, str]:
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": "1"}
STEPS = {"base": 2, "interp": 2, "sr1": 2}  # 2: the multistep solver uses its history
TEXT_DIM = 32
PROMPT_TOKENS = 77


# base and interp as the goldens were recorded: the tiny profile's two levels of then (spatial attention at 1/2 of
# 64x40; the profile now has three, attending at 1/4). The goldens check the pipelines' arithmetic around a UNet of
# the reference's class, whatever its size.
RECORDED_LEVELS = {"block_out_channels": [32, 64],
                   "down_block_types": ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
                   "up_block_types": ["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"]}


def unet_config(stage: str) -> dict[str, Any]:
    config = pixel_unet_config(stage, "tiny", text_dim=TEXT_DIM)
    return config if stage == "sr1" else config | RECORDED_LEVELS


def fill(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.02²) by a CPU generator seeded with `seed`, in state-dict order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(model.state_dict().items()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return model.eval()


def prompt_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (torch.randn(1, PROMPT_TOKENS, TEXT_DIM, generator=generator),
            torch.randn(1, PROMPT_TOKENS, TEXT_DIM, generator=generator))


def scheduler_kwargs() -> dict[str, Any]:
    config = pixel_scheduler_config()
    config.pop("_class_name")
    return config


def noising_kwargs() -> dict[str, Any]:
    config = image_noising_scheduler_config()
    config.pop("_class_name")
    return config


STAGE_SEEDS = {"base": 1, "interp": 2, "sr1": 3}
