"""Record golden numbers from Show-1's own code (showlab/Show-1), for tests/test_golden.py.

    python tests/golden/make_reference_goldens.py --show1-repo CHECKOUT [--out tests/golden]

CHECKOUT is a checkout of https://github.com/showlab/Show-1 (its `showone/` package is imported from there, never
copied into show1). The reference's base, interpolation and sr1 pipelines run exactly as its run_inference.py calls
them (seeds set again with torch.manual_seed at every stage, segment and window), on tiny UNets of the reference's
own class with the seeded weights of tiny.py, and every UNet call's inputs and output plus each stage's output are
written to `reference_<stage>.safetensors`. No test imports the reference: the tests compare show1 to these files.

Environment: the reference pins diffusers 0.19.3. Under a newer diffusers (show1's environment) it runs with
import-path aliases only (ALIASES below: modules that moved, names that moved, a mixin it never uses here); `einops`
must be importable (pip install einops). The sampler config carries final_sigmas_type=sigma_min, the last step of
diffusers 0.19, so the goldens are what the reference computed under the diffusers it pinned.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file as _save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiny  # noqa: E402

# diffusers 0.19 paths the reference imports → where they are now.
MODULE_ALIASES = {
    "diffusers.models.transformer_2d": "diffusers.models.transformers.transformer_2d",
    "diffusers.models.transformer_temporal": "diffusers.models.transformers.transformer_temporal",
    "diffusers.models.unet_2d_blocks": "diffusers.models.unets.unet_2d_blocks",
    "diffusers.models.unet_2d_condition": "diffusers.models.unets.unet_2d_condition",
}


def install_aliases() -> None:
    """Make the reference importable under the installed diffusers without touching its code."""
    import diffusers.loaders
    import diffusers.models.attention
    import diffusers.models.normalization
    import diffusers.utils
    import diffusers.utils.torch_utils

    for old, new in MODULE_ALIASES.items():
        sys.modules.setdefault(old, importlib.import_module(new))
    if not hasattr(diffusers.utils, "randn_tensor"):
        diffusers.utils.randn_tensor = diffusers.utils.torch_utils.randn_tensor
    if not hasattr(diffusers.models.attention, "AdaGroupNorm"):
        diffusers.models.attention.AdaGroupNorm = diffusers.models.normalization.AdaGroupNorm
    if not hasattr(diffusers.loaders, "LoraLoaderMixin"):  # a base class of the pipelines; no LoRA is loaded here
        diffusers.loaders.LoraLoaderMixin = type("LoraLoaderMixin", (), {})


class Recorder:
    """The inputs and output of the UNet calls numbered in `keep` (the files stay small; the stage outputs are kept
    whole)."""

    def __init__(self, unet: torch.nn.Module, keep: set[int]):
        self.calls: dict[int, dict[str, torch.Tensor]] = {}
        self.count, self.keep = 0, keep
        self.handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        self.count += 1
        if self.count - 1 not in self.keep:
            return
        names = ("sample", "timestep", "encoder_hidden_states")
        values = dict(zip(names, args, strict=False))
        values |= {key: value for key, value in kwargs.items() if key in (*names, "class_labels")}
        call = {name: torch.as_tensor(value).detach().clone() for name, value in values.items() if value is not None}
        sample = output[0] if isinstance(output, tuple) else output.sample
        call["output"] = sample.detach().clone()
        self.calls[self.count - 1] = call

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"call{i:03d}.{name}": value.contiguous() for i, call in self.calls.items()
                for name, value in call.items()}


def save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The tensors, with what decides their last bits: float sums depend on the CPU kernels and the thread count."""
    _save_file(tensors, str(path), metadata=tiny.recording_facts())


def reference_unet(stage: str, cls: Callable[..., torch.nn.Module]) -> torch.nn.Module:
    return tiny.fill(cls(**tiny.unet_config(stage)), tiny.STAGE_SEEDS[stage])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show1-repo", type=Path, required=True, help="a checkout of showlab/Show-1")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    sys.path.insert(0, str(args.show1_repo.resolve()))
    install_aliases()
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
    from showone.models import UNet3DConditionModel
    from showone.pipelines import TextToVideoIFInterpPipeline, TextToVideoIFPipeline
    from showone.pipelines.pipeline_t2v_sr_pixel_cond import TextToVideoIFSuperResolutionPipeline_Cond

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # one summation order, as the tests run them (tiny.ONE_THREAD)
    seed = tiny.SEED
    prompt_embeds, negative_embeds = tiny.prompt_embeddings()
    text = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}
    scheduler = lambda: DPMSolverMultistepScheduler(**tiny.scheduler_kwargs())  # noqa: E731

    # Keyframes (run_inference.py: 8 × 40 × 64, guidance 9.0).
    unet = reference_unet("base", UNet3DConditionModel)
    recorder = Recorder(unet, keep=set(range(tiny.STEPS["base"])))  # every step
    base = TextToVideoIFPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler(),
                                 feature_extractor=None)
    base.set_progress_bar_config(disable=True)
    keyframes = base(**text, num_frames=8, height=40, width=64, num_inference_steps=tiny.STEPS["base"],
                     guidance_scale=9.0, generator=torch.manual_seed(seed), output_type="pt").frames
    save_file(recorder.tensors() | {"frames": keyframes.contiguous()}, args.out / "reference_base.safetensors")
    recorder.handle.remove()

    # Interpolation: one shared start noise, then every segment with the seed set again.
    unet = reference_unet("interp", UNet3DConditionModel)
    recorder = Recorder(unet, keep=set(range(tiny.STEPS["interp"])))  # the first segment's steps
    interp = TextToVideoIFInterpPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler(),
                                         feature_extractor=None)
    interp.set_progress_bar_config(disable=True)
    from diffusers.utils.torch_utils import randn_tensor

    bsz, channel, num_frames, height, width = keyframes.shape
    frames = torch.zeros(bsz, channel, 3 * (num_frames - 1) + num_frames, height, width)
    frames[:, :, torch.arange(0, frames.shape[2], 4)] = keyframes
    init_noise = randn_tensor((bsz, channel, 5, height, width), generator=torch.manual_seed(seed),
                              dtype=keyframes.dtype)
    for i in range(num_frames - 1):
        segment = torch.zeros(bsz, channel, 5, height, width)
        segment[:, :, 0], segment[:, :, -1] = keyframes[:, :, i], keyframes[:, :, i + 1]
        segment = interp(pixel_values=segment, **text, num_frames=5, height=height, width=width,
                         num_inference_steps=tiny.STEPS["interp"], guidance_scale=4.0,
                         generator=torch.manual_seed(seed), output_type="pt", init_noise=init_noise,
                         cond_interpolation=True).frames
        frames[:, :, i * 4:i * 4 + 5] = segment
    save_file(recorder.tensors() | {"keyframes": keyframes.contiguous(), "frames": frames.contiguous()},
              args.out / "reference_interp.safetensors")
    recorder.handle.remove()

    # sr1: windows of 8 every 7 frames, the seed set again for each; window 0 conditioned on a given first frame
    # (IF-II-L's output in the reference) or on the noised upsample, later windows on the previous window's frame.
    unet = reference_unet("sr1", UNet3DConditionModel)
    sr1 = TextToVideoIFSuperResolutionPipeline_Cond(
        tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler(),
        image_noising_scheduler=DDPMScheduler(**tiny.noising_kwargs()), feature_extractor=None)
    sr1.set_progress_bar_config(disable=True)
    # A quarter of the interpolated frames' size (16 × 10 → 64 × 40), so the recorded calls stay small.
    low = torch.nn.functional.avg_pool2d(frames.permute(0, 2, 1, 3, 4).flatten(0, 1), 4)
    low = low.reshape(bsz, frames.shape[2], channel, *low.shape[-2:]).permute(0, 2, 1, 3, 4).contiguous()
    h, w = 4 * low.shape[-2], 4 * low.shape[-1]
    first_frame = torch.rand(1, 3, 1, h, w, generator=torch.Generator().manual_seed(11)) * 2 - 1
    for name, given in (("first_frame", first_frame), ("no_first_frame", None)):
        # The first step of window 0 (its condition) and, with a first frame, of window 1 (on window 0's frame).
        recorder = Recorder(unet, keep={0, tiny.STEPS["sr1"]} if given is not None else {0})
        out = torch.zeros(bsz, channel, low.shape[2], h, w)
        for i in range(0, low.shape[2] - 8 + 1, 7):
            condition = given if i == 0 else out[:, :, i:i + 1]
            out[:, :, i:i + 8] = sr1(image=low[:, :, i:i + 8], **text, first_frame_cond=condition, height=h,
                                     width=w, num_inference_steps=tiny.STEPS["sr1"], guidance_scale=7.0,
                                     noise_level=250, generator=torch.manual_seed(seed), output_type="pt").frames
        tensors = recorder.tensors() | {"input": low, "frames": out.contiguous()}
        if given is not None:
            tensors["first_frame"] = given[:, :, 0].contiguous()
        save_file(tensors, args.out / f"reference_sr1_{name}.safetensors")
        recorder.handle.remove()
    # The whole pixel cascade as run_inference.py chains it (each stage's frames handed on as they come out), at half
    # the published keyframe size (32 × 20 → sr1 at 128 × 80) with no first-frame model: stage outputs only.
    keyframes = base(**text, num_frames=8, height=20, width=32, num_inference_steps=tiny.STEPS["base"],
                     guidance_scale=9.0, generator=torch.manual_seed(seed), output_type="pt").frames
    init_noise = randn_tensor((1, 3, 5, 20, 32), generator=torch.manual_seed(seed), dtype=keyframes.dtype)
    frames = torch.zeros(1, 3, 29, 20, 32)
    for i in range(7):
        segment = torch.zeros(1, 3, 5, 20, 32)
        segment[:, :, 0], segment[:, :, -1] = keyframes[:, :, i], keyframes[:, :, i + 1]
        frames[:, :, i * 4:i * 4 + 5] = interp(
            pixel_values=segment, **text, num_frames=5, height=20, width=32, num_inference_steps=tiny.STEPS["interp"],
            guidance_scale=4.0, generator=torch.manual_seed(seed), output_type="pt", init_noise=init_noise,
            cond_interpolation=True).frames
    out = torch.zeros(1, 3, 29, 80, 128)
    for i in range(0, 29 - 8 + 1, 7):
        out[:, :, i:i + 8] = sr1(image=frames[:, :, i:i + 8], **text, first_frame_cond=None if i == 0 else
                                 out[:, :, i:i + 1], height=80, width=128, num_inference_steps=tiny.STEPS["sr1"],
                                 guidance_scale=7.0, noise_level=250, generator=torch.manual_seed(seed),
                                 output_type="pt").frames
    save_file({"base": keyframes.contiguous(), "interp": frames.contiguous(), "sr1": out.contiguous()},
              args.out / "reference_cascade.safetensors")
    print(f"wrote the goldens to {args.out}")


if __name__ == "__main__":
    main()
