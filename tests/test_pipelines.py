"""The stage pipelines and the cascade on tiny random weights (CPU)."""

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from show1.models.text import cuts_reported_once
from show1.pipelines.base import MissingComponentError, PromptEmbeddings
from show1.pipelines.cascade import Show1Pipeline, check_stages, run_stage
from show1.pipelines.interpolation import Show1InterpolationPipeline, interpolation_condition
from show1.pipelines.keyframes import Show1BasePipeline
from show1.pipelines.seeding import PerVideo, Reseeding
from show1.pipelines.sr1 import Show1SR1Pipeline, window_starts
from show1.pipelines.weights import init_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    init_weights(folder, "tiny")
    return folder


@pytest.fixture(scope="module")
def base(weights) -> Show1BasePipeline:
    pipe = Show1BasePipeline.from_pretrained(weights / "show-1-base")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_init_weights_writes_the_published_layout(weights):
    assert sorted(p.name for p in weights.iterdir()) == [
        "show-1-base", "show-1-interpolation", "show-1-sr1", "show-1-sr2"]
    index = json.loads((weights / "show-1-sr1" / "model_index.json").read_text())
    assert index["unet"] == ["show1.models.unet_3d_condition", "ShowOneUNet3DConditionModel"]
    assert "image_noising_scheduler" in index
    assert list((weights / "show-1-base" / "unet").glob("*.safetensors"))
    assert not list(weights.rglob("*.bin")) and not list(weights.rglob("*.pt"))


def test_init_weights_refuses_to_overwrite(weights):
    with pytest.raises(FileExistsError, match="--overwrite"):
        init_weights(weights, "tiny", stages=["base"])


def test_base_generates_keyframes_and_same_seed_gives_same_frames(base):
    first = base("a red kite over a beach", num_inference_steps=2, generator=seeded(1)).frames
    again = base("a red kite over a beach", num_inference_steps=2, generator=seeded(1)).frames
    other = base("a red kite over a beach", num_inference_steps=2, generator=seeded(2)).frames
    assert first.shape == (1, 3, 8, 40, 64) and first.abs().max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_base_save_load_round_trip_gives_identical_output(base, tmp_path):
    base.save_pretrained(tmp_path / "copy")
    loaded = Show1BasePipeline.from_pretrained(tmp_path / "copy")
    loaded.set_progress_bar_config(disable=True)
    before = base("a dog runs", num_inference_steps=2, generator=seeded(3)).frames
    after = loaded("a dog runs", num_inference_steps=2, generator=seeded(3)).frames
    assert torch.equal(before, after)


def test_prompt_errors_are_clear(base, caplog):
    with pytest.raises(ValueError, match="prompt is empty"):
        base("   ", num_inference_steps=1)
    with caplog.at_level(logging.WARNING, logger="show1.models.text"):
        base.encode_prompts("word " * 200)
    [record] = caplog.records
    assert record.getMessage().startswith("prompt 'word word") and "truncated: 125 of its 202 tokens cut, the " \
        "text encoder reads 77" in record.getMessage()


def test_a_cut_prompt_is_reported_once_per_generation_not_per_stage(base, caplog):
    """The base stage and sr2 (its own encoder, or the base's again) both embed the prompt: one line says it is cut."""
    long = "a red kite over a beach " + "and the sea " * 30
    with caplog.at_level(logging.WARNING, logger="show1.models.text"), cuts_reported_once():
        base.encode_prompts(long)
        base.encode_prompts(long, "low resolution, blur")
    assert len(caplog.records) == 1 and "tokens cut" in caplog.records[0].getMessage()
    caplog.clear()
    pipe = Show1Pipeline({"base": base})  # each call of the cascade is one generation
    with caplog.at_level(logging.WARNING, logger="show1.models.text"):
        pipe([long, "a dog"], seed=1, num_inference_steps=1, keyframe_size=(8, 8))
        pipe(long, seed=1, num_inference_steps=1, keyframe_size=(8, 8))
    assert [r.getMessage().split(" truncated")[0] for r in caplog.records] == [f"prompt {long[:60]!r}…"] * 2


def test_interpolation_condition_blends_the_ends_and_masks_them():
    ends = torch.stack([torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)], dim=2)
    condition = interpolation_condition(ends)
    assert condition.shape == (1, 4, 5, 4, 4)
    assert torch.allclose(condition[0, 0, :, 0, 0], torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    assert condition[0, 3, :, 0, 0].tolist() == [1, 0, 0, 0, 1]


def test_interpolation_turns_8_keyframes_into_29_frames(weights, base):
    interp = Show1InterpolationPipeline.from_pretrained(weights / "show-1-interpolation", load_text_encoder_=False)
    interp.set_progress_bar_config(disable=True)
    keyframes = torch.rand(1, 3, 8, 40, 64) * 2 - 1
    out = interp(keyframes, prompt_embeds=base.encode_prompts("a kite"), num_inference_steps=2,
                 generator=seeded(0)).frames
    assert out.shape == (1, 3, 29, 40, 64)
    with pytest.raises(ValueError, match="text encoder"):
        interp(keyframes, prompt="a kite", num_inference_steps=1)
    with pytest.raises(ValueError, match="segments_per_batch must be at least 1"):
        interp(keyframes, prompt_embeds=base.encode_prompts("a kite"), segments_per_batch=0)


def test_interpolation_segments_denoised_as_one_batch_equal_one_at_a_time(weights, base):
    """The segments of 2 videos (2 prompts, guidance on; 4 keyframes: 3 segments) in one UNet batch (a GPU's
    default), in batches of 2 (2 + 1), and one at a time (the reference's order of calls, a CPU's default) give the
    same frames. In float64, so that the comparison sees which noise, text and frames each segment gets, not
    rounding: in float32, batched kernels round differently from single ones and two guided steps magnify that
    (measured up to 4e-4 of a frame, more or less by CPU and library versions)."""
    from show1.pipelines.base import PromptEmbeddings

    interp = Show1InterpolationPipeline.from_pretrained(weights / "show-1-interpolation", load_text_encoder_=False,
                                                        torch_dtype=torch.float64)
    interp.set_progress_bar_config(disable=True)
    keyframes = (torch.rand(2, 3, 4, 20, 32, generator=seeded(1)) * 2 - 1).double()
    text = base.encode_prompts(["a kite", "a red boat at sea"])
    text = PromptEmbeddings(text.positive.double(), None if text.negative is None else text.negative.double())
    runs = {per: interp(keyframes, prompt_embeds=text, num_inference_steps=2, guidance_scale=4.0,
                        generator=seeded(0), segments_per_batch=per).frames for per in (3, 2, 1)}
    assert runs[1].abs().max() > 0.05 and not torch.allclose(runs[1][0], runs[1][1], atol=1e-3)  # not degenerate
    for per in (3, 2):
        assert (runs[per] - runs[1]).abs().max() < 1e-9, per


def test_sr1_windows_cover_every_frame():
    assert window_starts(29, 8, 7) == [0, 7, 14, 21]
    assert window_starts(9, 8, 7) == [0, 1]
    assert window_starts(5, 8, 7) == [0]


def test_sr1_upscales_in_windows_reusing_the_overlap_frame(weights, base):
    sr1 = Show1SR1Pipeline.from_pretrained(weights / "show-1-sr1", load_text_encoder_=False)
    sr1.set_progress_bar_config(disable=True)
    low = torch.rand(1, 3, 9, 10, 16) * 2 - 1
    out = sr1(low, prompt_embeds=base.encode_prompts("a kite"), height=40, width=64, num_inference_steps=2,
              generator=seeded(0)).frames
    assert out.shape == (1, 3, 9, 40, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="stride"):
        sr1(low, prompt_embeds=base.encode_prompts("a kite"), stride=9)


def test_stage_order_is_checked():
    assert check_stages(["base", "interp"]) == ("base", "interp")
    with pytest.raises(ValueError, match="out of order"):
        check_stages(["base", "sr1"])
    with pytest.raises(ValueError, match="unknown stage"):
        check_stages(["base", "sr3"])


def test_missing_component_is_named(weights, tmp_path):
    broken = tmp_path / "weights"
    shutil.copytree(weights / "show-1-base", broken / "show-1-base")
    shutil.rmtree(broken / "show-1-base" / "unet")
    with pytest.raises(MissingComponentError, match="'unet/'"):
        Show1Pipeline.from_pretrained(broken, ["base"])
    only_base = tmp_path / "only-base"
    shutil.copytree(weights / "show-1-base", only_base / "show-1-base")
    with pytest.raises(MissingComponentError, match="show-1-interpolation"):
        Show1Pipeline.from_pretrained(only_base, ["base", "interp"])


def test_published_model_index_maps_to_our_unet(weights, tmp_path):
    """The published model_index.json names showone.models.unet_3d_condition; it loads with our class."""
    folder = tmp_path / "show-1-base"
    shutil.copytree(weights / "show-1-base", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"_class_name": "TextToVideoIFPipeline", "unet": ["showone.models.unet_3d_condition",
                                                               "UNet3DConditionModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "checksums.json").unlink()  # published folders carry no show1 seal
    pipe = Show1BasePipeline.from_pretrained(folder)
    assert type(pipe.unet).__name__ == "ShowOneUNet3DConditionModel"


@pytest.mark.slow
def test_full_cascade_writes_29_frames_at_576x320(weights):
    pipe = Show1Pipeline.from_pretrained(weights)
    pipe.set_progress_bar_config(disable=True)
    steps = {"base": 1, "interp": 1, "sr1": 1, "sr2": 2}  # sr2 runs strength 0.8 of its steps
    no_guidance = dict.fromkeys(steps, 1.0)  # shapes only: one UNet pass per step instead of two
    result = pipe("a red kite over a beach", generator=seeded(345), num_inference_steps=steps,
                  guidance_scale=no_guidance)
    assert result.stages["base"].shape == (1, 3, 8, 40, 64)
    assert result.stages["interp"].shape == (1, 3, 29, 40, 64)
    assert result.stages["sr1"].shape == (1, 3, 29, 160, 256)
    assert result.frames.shape == (1, 3, 29, 320, 576)


def test_a_batch_of_prompts_makes_each_video_its_seed_makes_alone(weights):
    """Prompts batched through every stage, each with its own seed (PerVideo): video i is the video of prompt i
    generated alone with its seed. In float64, so that the comparison sees the random draws and the text, not
    rounding: batched kernels round differently from single ones (~2e-6 of a UNet output in float32), and the first
    step from pure noise magnifies that (~1e-3 of a frame with these random weights). Small frames: float64
    convolutions have no fast CPU kernels."""
    stages = Show1Pipeline.from_pretrained(weights, torch_dtype=torch.float64).stages
    pipe = Show1Pipeline({"base": stages["base"], "interp": stages["interp"]})
    pipe.set_progress_bar_config(disable=True)
    prompts, seed = ["a red kite over a beach", "Two dogs"], 11
    batched = pipe(prompts, seed=seed, num_inference_steps=1, keyframe_size=(8, 8))
    alone = [pipe(prompt, seed=seed + i, num_inference_steps=1, keyframe_size=(8, 8))
             for i, prompt in enumerate(prompts)]
    for stage, frames in batched.stages.items():
        assert frames.shape[0] == 2
        for i, single in enumerate(alone):
            assert torch.allclose(frames[i], single.stages[stage][0], rtol=0, atol=1e-6), stage
    assert not torch.allclose(batched.frames[0], batched.frames[1])  # two prompts, two seeds: two videos

    # sr1 (two windows: reseeded per window) and sr2 draw per video too; sr2 at 32 x 32 instead of 576 x 320.
    embeddings = stages["base"].encode_prompts(prompts, "")
    per_video = PerVideo((Reseeding(seed), Reseeding(seed + 1)))
    video = batched.frames[:, :, :9]
    runs = {"sr1": (1, dict(height=32, width=32)), "sr2": (2, dict(height=32, width=32))}
    for name, (steps, options) in runs.items():
        stages[name].set_progress_bar_config(disable=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sr1's note that no IF-II-L first frame is given
            together = run_stage(name, stages[name], prompts, video, embeddings, steps, None, per_video, **options)
            for i in range(2):
                one = run_stage(name, stages[name], prompts[i], video[i:i + 1], PromptEmbeddings(
                    embeddings.positive[i:i + 1], embeddings.negative[i:i + 1]), steps, None, Reseeding(seed + i),
                    **options)
                assert torch.allclose(together[i], one[0], rtol=0, atol=1e-6), name


def test_a_batch_refuses_what_would_draw_from_a_shared_stream(base):
    seeds = PerVideo((Reseeding(1), Reseeding(2)))
    with pytest.raises(ValueError, match=r"reference_dropout.*batch size 1"):
        base(["a", "b"], generator=seeds, num_inference_steps=1, reference_dropout=True)
    from diffusers import DPMSolverMultistepScheduler

    sde = Show1BasePipeline(base.unet, DPMSolverMultistepScheduler.from_config(
        {**base.scheduler.config, "algorithm_type": "sde-dpmsolver++"}), base.tokenizer, base.text_encoder)
    with pytest.raises(ValueError, match=r"draws noise at every step.*batch size 1"):
        sde(["a", "b"], generator=seeds, num_inference_steps=1)
    with pytest.raises(ValueError, match="3 seeds for 2 prompts"):
        Show1Pipeline({"base": base})(["a", "b"], seed=[1, 2, 3], num_inference_steps=1)
