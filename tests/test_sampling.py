"""The published Show-1 sampling semantics (params.yaml `sampling:`): DPM-Solver's last step, lowercased prompts,
the reference's reseeding at every stage, segment and window, and the opt-in base dropout."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers.models.resnet import TemporalConvLayer
from test_text import t5_folder  # noqa: F401  (the tiny cased T5 fixture)

from show1.config import Sampling
from show1.models.text import load_text_encoder
from show1.pipelines.base import load_scheduler
from show1.pipelines.cascade import Show1Pipeline
from show1.pipelines.interpolation import Show1InterpolationPipeline
from show1.pipelines.keyframes import Show1BasePipeline
from show1.pipelines.seeding import Reseeding
from show1.pipelines.sr1 import NO_FIRST_FRAME, Show1SR1Pipeline
from show1.pipelines.weights import build_stage, init_weights

PROMPT = "a red kite over a beach"


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("sampling")
    written = init_weights(folder, "tiny", stages=["base", "interp", "sr1"])
    loaded = {"base": Show1BasePipeline.from_pretrained(written["base"]),
              "interp": Show1InterpolationPipeline.from_pretrained(written["interp"], load_text_encoder_=False),
              "sr1": Show1SR1Pipeline.from_pretrained(written["sr1"], load_text_encoder_=False)}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    loaded["folders"] = written
    return loaded


def video(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_defaults_are_the_published_behaviour():
    assert Sampling() == Sampling(final_sigmas_type="sigma_min", lowercase_prompts=True, seeding="reference",
                                  reference_dropout=False)
    assert Sampling().as_params()["sampling.seeding"] == "reference"


def test_a_scheduler_folder_without_final_sigmas_keeps_the_published_last_step(stages, tmp_path):
    written = stages["folders"]["base"] / "scheduler"
    assert json.loads((written / "scheduler_config.json").read_text())["final_sigmas_type"] == "sigma_min"
    published = tmp_path / "scheduler"  # as the published folders were written, by diffusers 0.19
    published.mkdir()
    config = json.loads((written / "scheduler_config.json").read_text())
    del config["final_sigmas_type"]
    (published / "scheduler_config.json").write_text(json.dumps(config))
    assert load_scheduler(published, None).config.final_sigmas_type == "sigma_min"


def test_the_last_solver_step_is_a_setting_that_changes_the_sample(stages):
    cascade = Show1Pipeline({"base": stages["base"]})
    published = cascade(PROMPT, seed=1, num_inference_steps=3).frames
    zero = cascade(PROMPT, seed=1, num_inference_steps=3, sampling=Sampling(final_sigmas_type="zero")).frames
    assert cascade.stages["base"].scheduler.config.final_sigmas_type == "zero"
    assert not torch.equal(published, zero)
    again = cascade(PROMPT, seed=1, num_inference_steps=3).frames  # and back
    assert torch.equal(published, again)


def test_reference_seeding_gives_each_stage_a_freshly_seeded_generator(stages):
    cascade = Show1Pipeline({"base": stages["base"], "interp": stages["interp"]})
    out = cascade(PROMPT, seed=7, num_inference_steps=1)
    # Each stage is what it gives alone with the seed just set, as if no stage had drawn before it (the keyframes
    # handed on unclamped, as the reference does); the stream of one generator through the cascade does not give that.
    embeddings = stages["base"].encode_prompts(PROMPT)
    keyframes = stages["base"](prompt_embeds=embeddings, num_inference_steps=1,
                               generator=torch.Generator().manual_seed(7), clamp_output=False).frames
    assert torch.equal(out.stages["base"], keyframes.clamp(-1, 1))
    alone = stages["interp"](keyframes, prompt_embeds=embeddings, num_inference_steps=1,
                             generator=torch.Generator().manual_seed(7)).frames
    assert torch.equal(out.frames, alone)
    streamed = cascade(PROMPT, seed=7, num_inference_steps=1, sampling=Sampling(seeding="stream"))
    assert torch.equal(streamed.stages["base"], out.stages["base"])  # base draws first either way
    assert not torch.equal(streamed.frames, out.frames)
    with pytest.raises(ValueError, match="either seed or generator"):
        cascade(PROMPT, seed=7, generator=torch.Generator())


def test_reference_seeding_reseeds_every_sr1_window(stages):
    sr1, low = stages["sr1"], video((1, 3, 15, 10, 16), seed=3)  # windows at 0 and 7 (8 frames, stride 7)
    embeddings = stages["base"].encode_prompts(PROMPT)
    reseeded = sr1(low, prompt_embeds=embeddings, height=40, width=64, num_inference_steps=1,
                   generator=Reseeding(5)).frames
    # The reference's loop: every window with the seed set again, the second conditioned on the first's last frame.
    text, levels = embeddings.for_guidance(True), torch.full((1,), 250)
    first = sr1.super_resolve_window(low[:, :, :8], text, levels, None, 40, 64, 1, 7.0, torch.manual_seed(5))
    second = sr1.super_resolve_window(low[:, :, 7:], text, levels, first[:, :, 7], 40, 64, 1, 7.0,
                                      torch.manual_seed(5))
    # (the second window regenerates the overlap frame 7)
    assert torch.equal(reseeded[:, :, :7], first[:, :, :7].clamp(-1, 1))
    assert torch.equal(reseeded[:, :, 7:], second.clamp(-1, 1))
    streamed = sr1(low, prompt_embeds=embeddings, height=40, width=64, num_inference_steps=1,
                   generator=torch.Generator().manual_seed(5)).frames
    assert torch.equal(streamed[:, :, :7], reseeded[:, :, :7]) and not torch.equal(streamed[:, :, 7:],
                                                                                   reseeded[:, :, 7:])


def test_reseeding_leaves_the_callers_random_state_alone(stages):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Show1Pipeline({"base": stages["base"]})(PROMPT, seed=9, num_inference_steps=1)
    assert torch.equal(torch.rand(3), expected)


def test_prompts_are_lowercased_for_a_cased_t5(t5_folder):  # noqa: F811
    text = load_text_encoder(t5_folder)
    base = build_stage("base", "tiny", text[1].config.hidden_size, text)
    shouted = base.encode_prompts("  A Red Kite ").positive
    assert torch.equal(shouted, base.encode_prompts("a red kite", lowercase=False).positive)
    assert not torch.equal(shouted, base.encode_prompts("  A Red Kite ", lowercase=False).positive)


def test_reference_dropout_is_opt_in_and_deterministic(stages):
    base = stages["base"]
    generator = torch.Generator().manual_seed(0)
    for layer in base.unet.modules():  # trained weights: the zero-initialised last conv no longer hides dropout
        if isinstance(layer, TemporalConvLayer):
            layer.conv4[-1].weight.data.normal_(0, 0.05, generator=generator)
    try:
        cascade = Show1Pipeline({"base": base})
        plain = cascade(PROMPT, seed=2, num_inference_steps=1).frames
        dropout = Sampling(reference_dropout=True)
        dropped = cascade(PROMPT, seed=2, num_inference_steps=1, sampling=dropout).frames
        assert not torch.equal(plain, dropped)
        assert torch.equal(dropped, cascade(PROMPT, seed=2, num_inference_steps=1, sampling=dropout).frames)
        assert not base.unet.training  # back in eval mode
    finally:
        for layer in base.unet.modules():
            if isinstance(layer, TemporalConvLayer):
                layer.conv4[-1].weight.data.zero_()


def test_sr1_without_a_first_frame_says_so_once(stages, caplog):
    low, embeddings = video((1, 3, 8, 10, 16), seed=4), stages["base"].encode_prompts(PROMPT)
    sr1 = Show1SR1Pipeline(**{k: v for k, v in stages["sr1"].components.items()})  # a new pipeline: not yet said
    sr1.set_progress_bar_config(disable=True)
    options = {"prompt_embeds": embeddings, "height": 40, "width": 64, "num_inference_steps": 1}
    with caplog.at_level(logging.WARNING, logger="show1.pipelines.sr1"):
        sr1(low, generator=Reseeding(0), **options)
        sr1(low, generator=Reseeding(0), **options)
        assert [r.getMessage() for r in caplog.records].count(NO_FIRST_FRAME) == 1
        caplog.clear()
        given = Show1SR1Pipeline(**{k: v for k, v in stages["sr1"].components.items()})
        given.set_progress_bar_config(disable=True)
        given(low, first_frame=torch.zeros(1, 3, 40, 64), generator=Reseeding(0), **options)
        assert NO_FIRST_FRAME not in [r.getMessage() for r in caplog.records]
