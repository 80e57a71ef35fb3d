"""show1's pixel stages against numbers recorded from Show-1's own code (tests/golden/make_reference_goldens.py ran
the reference's pipelines as its run_inference.py calls them, on tiny seeded UNets of the reference's class).
The reference is not imported here: show1's pipelines, on the same weights and embeddings, must feed their UNets
the same inputs and give the same frames, within 1e-5."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from safetensors import safe_open
from safetensors.torch import load_file

from show1.models.unet_3d_condition import ShowOneUNet3DConditionModel
from show1.pipelines.base import PromptEmbeddings
from show1.pipelines.cascade import Show1Pipeline
from show1.pipelines.interpolation import Show1InterpolationPipeline
from show1.pipelines.keyframes import Show1BasePipeline
from show1.pipelines.seeding import Reseeding
from show1.pipelines.sr1 import Show1SR1Pipeline

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
import tiny  # noqa: E402
from make_reference_goldens import Recorder  # noqa: E402

TOLERANCE = 1e-5  # absolute, plus the same relative to the reference's value (UNet samples reach ~4)
# Where the CPU kernels or torch differ from the recording's, float sums round differently (a different summation
# order moved values by 1.7e-5 here): a looser bound, still far below any semantic difference (e.g. 0.023 for
# DPM-Solver's last step).
OTHER_MACHINE_TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """The goldens were recorded with one CPU thread: the same summation order here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def golden(name: str) -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / f"reference_{name}.safetensors")


def tolerance() -> float:
    with safe_open(GOLDEN / "reference_base.safetensors", "pt") as recorded:
        facts = recorded.metadata() or {}
    return TOLERANCE if facts == tiny.recording_facts() else OTHER_MACHINE_TOLERANCE


def unet(stage: str) -> ShowOneUNet3DConditionModel:
    return tiny.fill(ShowOneUNet3DConditionModel.from_config(tiny.unet_config(stage)), tiny.STAGE_SEEDS[stage])


def embeddings() -> PromptEmbeddings:
    positive, negative = tiny.prompt_embeddings()
    return PromptEmbeddings(positive, negative)


def assert_calls_match(recorded: Recorder, reference: dict[str, torch.Tensor]) -> None:
    ours = recorded.tensors()
    expected = {key: value for key, value in reference.items() if key.startswith("call")}
    assert expected and set(expected) <= set(ours), sorted(set(expected) - set(ours))
    for key, value in expected.items():
        close(ours[key].float(), value.float(), key)


def close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    bound = tolerance()
    excess = ((ours - reference).abs() - bound * (1 + reference.abs())).max().item()
    difference = (ours - reference).abs().max().item()
    assert excess <= 0, f"{what}: differs from the reference by up to {difference:.3g} (bound {bound:g})"


def assert_frames_match(frames: torch.Tensor, reference: torch.Tensor) -> None:
    # The reference hands on its frames unclamped ("pt"); show1's stage outputs are clamped to [-1, 1].
    close(frames, reference.clamp(-1, 1), "frames")


def pipeline(cls, stage: str, **extra):
    pipe = cls(unet=unet(stage), scheduler=DPMSolverMultistepScheduler(**tiny.scheduler_kwargs()), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_base_matches_the_reference():
    reference = golden("base")
    base = pipeline(Show1BasePipeline, "base")
    recorded = Recorder(base.unet, keep=set(range(tiny.STEPS["base"])))
    frames = base(prompt_embeds=embeddings(), num_frames=8, height=40, width=64,
                  num_inference_steps=tiny.STEPS["base"], guidance_scale=9.0, generator=Reseeding(tiny.SEED)).frames
    assert_calls_match(recorded, reference)
    assert_frames_match(frames, reference["frames"])


def test_interpolation_matches_the_reference():
    reference = golden("interp")
    interp = pipeline(Show1InterpolationPipeline, "interp")
    recorded = Recorder(interp.unet, keep=set(range(tiny.STEPS["interp"])))
    frames = interp(reference["keyframes"], prompt_embeds=embeddings(), num_inference_steps=tiny.STEPS["interp"],
                    guidance_scale=4.0, generator=Reseeding(tiny.SEED)).frames
    assert_calls_match(recorded, reference)
    assert_frames_match(frames, reference["frames"])


@pytest.mark.parametrize("first_frame", [True, False], ids=["first_frame", "no_first_frame"])
def test_sr1_matches_the_reference(first_frame):
    reference = golden("sr1_first_frame" if first_frame else "sr1_no_first_frame")
    sr1 = pipeline(Show1SR1Pipeline, "sr1", image_noising_scheduler=DDPMScheduler(**tiny.noising_kwargs()))
    keep = {0, tiny.STEPS["sr1"]} if first_frame else {0}
    recorded = Recorder(sr1.unet, keep=keep)
    low = reference["input"]
    frames = sr1(low, prompt_embeds=embeddings(), height=4 * low.shape[-2], width=4 * low.shape[-1],
                 num_inference_steps=tiny.STEPS["sr1"], guidance_scale=7.0, noise_level=250,
                 first_frame=reference["first_frame"] if first_frame else None, generator=Reseeding(tiny.SEED)).frames
    assert_calls_match(recorded, reference)
    assert_frames_match(frames, reference["frames"])


def test_the_pixel_cascade_matches_the_reference_chain():
    # base → interp → sr1 as run_inference.py chains them (frames handed on unclamped, the seed set again for every
    # stage, segment and window; no first-frame model), at half the published keyframe size.
    stages = {"base": pipeline(Show1BasePipeline, "base"), "interp": pipeline(Show1InterpolationPipeline, "interp"),
              "sr1": pipeline(Show1SR1Pipeline, "sr1", image_noising_scheduler=DDPMScheduler(**tiny.noising_kwargs()))}
    out = Show1Pipeline(stages)("(embeddings given)", prompt_embeds=embeddings(), seed=tiny.SEED,
                                num_inference_steps=tiny.STEPS, keyframe_size=(32, 20))
    reference = golden("cascade")
    for stage in ("base", "interp", "sr1"):
        assert_frames_match(out.stages[stage], reference[stage])
