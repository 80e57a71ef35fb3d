"""sr1's first frame from DeepFloyd IF-II-L (diffusers' IFSuperResolutionPipeline), with tiny IF-II-shaped components
built from config and saved as safetensors, loaded the way a published IF-II-L folder is."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler, IFSuperResolutionPipeline, UNet2DConditionModel

from show1.config import load_params
from show1.pipelines.base import MissingComponentError
from show1.pipelines.cascade import Show1Pipeline
from show1.pipelines.first_frame import load_first_frame_model, super_resolve_first_frame
from show1.pipelines.keyframes import Show1BasePipeline
from show1.pipelines.seeding import Reseeding
from show1.pipelines.weights import init_weights
from show1.registry.resolve import load_cascade
from show1.weight_files import UnsafeWeightsError

MINILM_DIM = 384  # the tiny profile's text encoder: IF-II-L gets the base stage's embeddings


def write_tiny_if_ii(folder: Path) -> Path:
    """IF-II-L's layout (6-channel pixel UNet with the noise level as class label, T5 projection, DDPM schedulers) at
    test size, random weights."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=6, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", norm_num_groups=8, attention_head_dim=8,
        cross_attention_dim=32, encoder_hid_dim=MINILM_DIM, encoder_hid_dim_type="text_proj",
        addition_embed_type="text", addition_embed_type_num_heads=2, class_embed_type="timestep",
        resnet_time_scale_shift="scale_shift", act_fn="gelu", cross_attention_norm="group_norm",
        resnet_skip_time_act=True, resnet_out_scale_factor=math.sqrt(2), mid_block_scale_factor=math.sqrt(2),
        time_embedding_act_fn="gelu")
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                              dynamic_thresholding_ratio=0.95, sample_max_value=1.0)
    noising = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_small", clip_sample=True)
    pipe = IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler,
                                     image_noising_scheduler=noising, safety_checker=None, feature_extractor=None,
                                     watermarker=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-frame")
    weights = init_weights(root / "weights", "tiny", stages=["base", "interp", "sr1"])
    base = Show1BasePipeline.from_pretrained(weights["base"])
    return {"root": root, "weights": root / "weights", "if_ii": write_tiny_if_ii(root / "if-ii-l"),
            "embeddings": base.encode_prompts("a red kite over a beach")}


def test_a_first_frame_is_the_if_ii_super_resolution_of_frame_0(setup):
    model = load_first_frame_model(setup["if_ii"])
    assert model.text_encoder is None and model.safety_checker is None
    low = torch.rand(1, 3, 10, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    kwargs = {"num_inference_steps": 2}
    frame = super_resolve_first_frame(model, low, setup["embeddings"], 40, 64, torch.manual_seed(4), **kwargs)
    assert frame.shape == (1, 3, 40, 64) and torch.isfinite(frame).all()
    again = super_resolve_first_frame(model, low, setup["embeddings"], 40, 64, torch.manual_seed(4), **kwargs)
    other = super_resolve_first_frame(model, low, setup["embeddings"], 40, 64, torch.manual_seed(5), **kwargs)
    assert torch.equal(frame, again) and not torch.equal(frame, other)


def test_the_cascade_makes_sr1s_first_frame_with_the_seed_set_again(setup):
    model = load_first_frame_model(setup["if_ii"])
    cascade = Show1Pipeline.from_pretrained(setup["weights"], ["base", "interp", "sr1"])
    assert cascade.first_frame(torch.zeros(1, 3, 29, 10, 16), setup["embeddings"], Reseeding(4)) is None
    cascade.first_frame_model = model
    video = torch.rand(1, 3, 29, 10, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    made = cascade.first_frame(video, setup["embeddings"], Reseeding(4))
    expected = super_resolve_first_frame(model, video[:, :, 0], setup["embeddings"], 40, 64, torch.manual_seed(4))
    assert torch.equal(made, expected)  # 70 steps, guidance 4.0, noise level 150, the ×4 size: the reference's call


def test_params_name_the_first_frame_model_for_generation(setup, tmp_path):
    doc = {"sampling": {"first_frame_model": str(setup["if_ii"])}, "paths": {"cache": str(tmp_path / "cache")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    params = load_params(tmp_path / "params.yaml")
    loaded = load_cascade(params, ("base", "interp", "sr1"), weights_dir=setup["weights"])
    assert isinstance(loaded.pipeline.first_frame_model, IFSuperResolutionPipeline)
    assert load_cascade(params, ("base", "interp"), weights_dir=setup["weights"]).pipeline.first_frame_model is None
    assert params.sampling.as_params()["sampling.first_frame_model"] == str(setup["if_ii"])


def test_bad_first_frame_folders_are_named(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sampling\.first_frame_model .*folder not found"):
        load_first_frame_model(tmp_path / "none")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "model_index.json").write_text("{}")
    with pytest.raises(MissingComponentError, match="missing 'unet'"):
        load_first_frame_model(tmp_path / "partial")
    pickled = tmp_path / "pickled"
    write_tiny_if_ii(pickled)
    for weights in (pickled / "unet").glob("*.safetensors"):  # weights as a pickle only, like an old download
        weights.unlink()
    torch.save({"weight": torch.zeros(1)}, pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="convert-weights"):
        load_first_frame_model(pickled)


def test_sr1_is_registered_with_its_first_frame_model_and_loads_with_it(setup, tmp_path):
    from mlflow.tracking import MlflowClient

    from show1.models.text import tiny_text_encoder_dir
    from show1.registry.register import register_stage

    plain = {"paths": {"cache": str(tmp_path / "cache")}, "registry": {"model_prefix": "ff"}}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    with_model = plain | {"sampling": {"first_frame_model": str(setup["if_ii"])}}
    (tmp_path / "with.yaml").write_text(yaml.safe_dump(with_model))
    params, configured = load_params(tmp_path / "plain.yaml"), load_params(tmp_path / "with.yaml")
    weights, minilm = setup["weights"], tiny_text_encoder_dir()
    register_stage(params, "base", weights / "show-1-base")
    register_stage(params, "interp", weights / "show-1-interpolation", text_encoder=minilm)
    without = register_stage(params, "sr1", weights / "show-1-sr1", text_encoder=minilm)
    bundled = register_stage(configured, "sr1", weights / "show-1-sr1", text_encoder=minilm)
    assert bundled.created and bundled.version != without.version and bundled.content_hash != without.content_hash
    version = MlflowClient().get_model_version("ff-sr1", bundled.version)
    assert version.tags["first_frame_source"] == str(setup["if_ii"].resolve())
    # Loaded from the registry with no first-frame setting, the cascade uses the IF-II-L that came with sr1.
    loaded = load_cascade(params, ("base", "interp", "sr1"), "challenger")
    assert isinstance(loaded.pipeline.first_frame_model, IFSuperResolutionPipeline)
    assert loaded.sources["sr1"] == f"ff-sr1/{bundled.version}"
    assert load_cascade(params, ("base", "interp", "sr1"), f"base=1,interp=1,sr1={without.version}") \
        .pipeline.first_frame_model is None
