"""SR2, the latent expert-translation stage, on tiny random weights: shapes, seeding, exactness against diffusers'
(deprecated) VideoToVideoSDPipeline, folder round trip, VAE slicing, PIL-like resizing and input errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
from PIL import Image
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from show1.models.text import MAX_LENGTH, tiny_text_encoder_dir
from show1.pipelines.base import PromptEmbeddings
from show1.pipelines.sr2 import (
    Show1SR2Pipeline,
    paper_sr2_unet_config,
    paper_sr2_vae_config,
    resize_like_pil,
    tiny_sr2_components,
)

TEXT_DIM = 32
PROMPT = "a burning lamborghini driving on a rainbow"
SIZE = {"height": 32, "width": 48}
FAST = {"num_inference_steps": 4, "strength": 0.75}  # 3 denoising steps


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine oversubscription makes them ~20× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_text() -> tuple[Any, CLIPTextModel]:
    """The packaged MiniLM (BERT) tokenizer with a random CLIP text encoder over its vocabulary: a CLIP encoder is
    what the published SR2 (zeroscope) uses, and it is run without a padding mask, as the reference does."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_encoder_dir())
    tokenizer.model_max_length = MAX_LENGTH
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=MAX_LENGTH, pad_token_id=0,
                            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return tokenizer, CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def pipe() -> Show1SR2Pipeline:
    components = tiny_sr2_components(TEXT_DIM, seed=0)
    # Zero-initialised weights (the last temporal conv of each block, …) would make the temporal layers identities;
    # fill them so frames really mix and a frame-ordering bug changes the output.
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in components["unet"].parameters():
            if not param.any():
                param.normal_(0, 0.05, generator=generator)
    tokenizer, text_encoder = _tiny_text()
    pipeline = Show1SR2Pipeline(**components, tokenizer=tokenizer, text_encoder=text_encoder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _video(batch: int = 1, frames: int = 4, height: int = 16, width: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _run(pipe: Show1SR2Pipeline, video: torch.Tensor, seed: int = 0, **kwargs: Any) -> Any:
    options = {"prompt": PROMPT, **SIZE, **FAST, **kwargs}
    return pipe(video, generator=torch.Generator().manual_seed(seed), **options).frames


def test_sr2_upscales_each_video_to_the_requested_size_in_range(pipe):
    frames = _run(pipe, _video(batch=2, frames=4, height=16, width=24))
    assert frames.shape == (2, 3, 4, 32, 48)
    assert frames.dtype == torch.float32 and frames.min() >= -1 and frames.max() <= 1
    assert frames.std() > 0.05  # not a constant image
    assert not torch.equal(frames[0], frames[1])  # each video keeps its own content and noise

    array = _run(pipe, _video(), output_type="np")
    assert array.shape == (1, 4, 32, 48, 3) and array.dtype == np.uint8


def test_sr2_same_seed_repeats_and_another_seed_differs(pipe):
    video = _video()
    first, again, other = _run(pipe, video, seed=7), _run(pipe, video, seed=7), _run(pipe, video, seed=8)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2


def test_sr2_equals_diffusers_video_to_video_pipeline(pipe):
    """Same weights, scheduler, prompts and seed as diffusers' VideoToVideoSDPipeline (which Show-1 runs for SR2):
    the frames agree to float precision.

    Deliberate difference: the reference expects frames already PIL-resized to the output size, while ours resizes
    a (B, 3, F, h, w) tensor itself (`resize_like_pil`, tested against PIL below). Both get the same frames at the
    output size here, so no resize happens and the comparison is exact. The reference returns (B, F, 3, H, W) in
    [0, 1], ours (B, 3, F, H, W) in [-1, 1].
    """
    from diffusers import VideoToVideoSDPipeline

    reference = VideoToVideoSDPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                       unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    reference.set_progress_bar_config(disable=True)
    unit = torch.rand(1, 4, 3, 32, 48, generator=torch.Generator().manual_seed(11))  # (B, F, C, H, W) in [0, 1]
    options = {"strength": 0.8, "num_inference_steps": 10, "guidance_scale": 15.0,
               "negative_prompt": "low resolution, blur"}

    ours = pipe((2 * unit - 1).permute(0, 2, 1, 3, 4), prompt=PROMPT, generator=torch.Generator().manual_seed(0),
                **SIZE, **options).frames
    theirs = reference(PROMPT, video=unit, generator=torch.Generator().manual_seed(0), output_type="pt",
                       **options).frames

    difference = (ours.permute(0, 2, 1, 3, 4) * 0.5 + 0.5 - theirs).abs().max().item()
    assert difference <= 1e-5, difference
    assert theirs.std() > 0.05


def test_sr2_reuses_prompt_embeddings_it_computed(pipe):
    video = _video()
    embeddings = pipe.encode_prompts(PROMPT, "low resolution, blur")
    assert torch.equal(_run(pipe, video), _run(pipe, video, prompt=None, prompt_embeds=embeddings))


def test_sr2_folder_round_trip_gives_identical_frames(pipe, tmp_path: Path):
    pipe.save_pretrained(tmp_path / "sr2")
    for name in ("vae", "unet", "scheduler", "tokenizer", "text_encoder"):
        assert (tmp_path / "sr2" / name).is_dir(), name
    loaded = Show1SR2Pipeline.from_pretrained(tmp_path / "sr2")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, UNet3DConditionModel) and isinstance(loaded.vae, AutoencoderKL)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    video = _video()
    assert torch.equal(_run(pipe, video), _run(loaded, video))

    without_text = Show1SR2Pipeline.from_pretrained(tmp_path / "sr2", load_text_encoder_=False)
    without_text.set_progress_bar_config(disable=True)
    embeddings = pipe.encode_prompts(PROMPT, "low resolution, blur")
    assert torch.equal(_run(pipe, video), _run(without_text, video, prompt=None, prompt_embeds=embeddings))


def test_sr2_vae_slicing_changes_nothing(pipe):
    video = _video(batch=2, frames=3)
    whole = _run(pipe, video)
    pipe.enable_vae_slicing()
    try:
        assert pipe.vae.use_slicing
        sliced = _run(pipe, video)
    finally:
        pipe.disable_vae_slicing()
    assert (whole - sliced).abs().max() <= 5e-5  # batch size changes the conv kernels: float noise only


@pytest.mark.parametrize(("size", "image"), [((576, 320), "smooth"), ((576, 320), "noise"), ((20, 12), "noise")])
def test_resize_like_pil_is_within_one_level_of_pil(size, image):
    """Up (the paper's 256×160 → 576×320) and down, on smooth and on worst-case (noise) content."""
    rng = np.random.default_rng(0)
    if image == "noise":
        pixels = rng.integers(0, 256, (160, 256, 3), dtype=np.uint8)
    else:
        yy, xx = np.mgrid[0:160, 0:256]
        pixels = np.stack([127 + 120 * np.sin(xx / 7 + c) * np.cos(yy / 5) for c in range(3)], -1).round()
        pixels = pixels.astype(np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize(size), dtype=np.float32) / 127.5 - 1
    video = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    resized = resize_like_pil(video, height=size[1], width=size[0])[0, :, 0].permute(1, 2, 0).numpy()
    assert resized.shape == expected.shape
    assert np.abs(resized - expected).max() <= 1.5 / 127.5  # PIL rounds to 8 bits; we stay in float


@pytest.mark.parametrize(("change", "named"), [
    ({"video": torch.zeros(3, 4, 16, 24)}, "video"),
    ({"video": torch.zeros(1, 4, 4, 16, 24)}, "video"),
    ({"video": torch.full((1, 3, 4, 16, 24), 255.0)}, "video"),
    ({"video": torch.full((1, 3, 4, 16, 24), float("nan"))}, "video"),
    ({"strength": 0.0}, "strength"),
    ({"strength": 1.5}, "strength"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 2, "strength": 0.2}, "strength"),
    ({"height": 33}, "height"),
    ({"width": 0}, "width"),
    ({"output_type": "pil"}, "output_type"),
    ({"prompt": [PROMPT, PROMPT]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": "  "}, "prompt"),
])
def test_sr2_rejects_bad_input_naming_it(pipe, change, named):
    arguments = {"video": _video(), "prompt": PROMPT, **SIZE, **FAST, **change}
    with pytest.raises(ValueError, match=named):
        pipe(**arguments)


def test_sr2_without_text_encoder_asks_for_embeddings(pipe):
    bare = Show1SR2Pipeline(vae=pipe.vae, unet=pipe.unet, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="prompt_embeds"):
        bare(_video(), prompt=PROMPT, **SIZE, **FAST)
    with pytest.raises(ValueError, match="negative"):
        bare(_video(), prompt_embeds=PromptEmbeddings(torch.zeros(1, MAX_LENGTH, TEXT_DIM), None), **SIZE, **FAST)
    t5_like = PromptEmbeddings(torch.zeros(1, MAX_LENGTH, 4 * TEXT_DIM), torch.zeros(1, MAX_LENGTH, 4 * TEXT_DIM))
    with pytest.raises(ValueError, match="prompt_embeds are 128 wide"):
        bare(_video(), prompt_embeds=t5_like, **SIZE, **FAST)


def test_paper_configs_have_the_published_sizes():
    """fp16 weights of 2.82 GB (UNet) and 167 MB (VAE), the published zeroscope v2 file sizes."""
    with torch.device("meta"):
        unet = UNet3DConditionModel(**paper_sr2_unet_config())
        vae = AutoencoderKL(**paper_sr2_vae_config())
    assert sum(p.numel() for p in unet.parameters()) == 1_411_233_860
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # 576×320 frames → 72×40 latents
