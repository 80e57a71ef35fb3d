"""The Show-1 pixel UNet3D: checkpoint compatibility with the published key names, inflation, forward."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from show1.models import ShowOneUNet3DConditionModel
from show1.models.configs import pixel_unet_config

KEYS = Path(__file__).parent / "data" / "show1-unet-keys"
PARAMS = json.loads((KEYS / "show1_unet_param_counts.json").read_text())


def reference(name: str) -> tuple[dict, list[tuple[str, list[int]]]]:
    config = json.loads((KEYS / f"show1_unet_config_{name}.json").read_text())
    rows = [line.rstrip("\n").split("\t") for line in (KEYS / f"show1_unet_keys_{name}.tsv").open()]
    return config, [(key, json.loads(shape)) for key, shape in rows]


def state_dict_rows(model: torch.nn.Module) -> list[tuple[str, list[int]]]:
    return [(key, list(value.shape)) for key, value in model.state_dict().items()]


def test_tiny_state_dict_matches_the_original_show1_unet_exactly():
    config, expected = reference("tiny")
    model = ShowOneUNet3DConditionModel.from_config(config)
    assert state_dict_rows(model) == expected  # names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == PARAMS["tiny"]["num_params"] == 1_507_750


@pytest.mark.parametrize("name", ["base", "interp", "sr1"])
def test_paper_state_dicts_match_on_the_meta_device(name):
    config, expected = reference(name)
    with torch.device("meta"):
        model = ShowOneUNet3DConditionModel.from_config(config)
    assert state_dict_rows(model) == expected
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]["num_params"]


def test_base_parameter_count_is_the_published_one():
    with torch.device("meta"):
        model = ShowOneUNet3DConditionModel.from_config(pixel_unet_config("base", "paper"))
    assert sum(p.numel() for p in model.parameters()) == 1_726_848_390


def test_registry_paper_configs_equal_the_published_ones():
    for stage, name in (("base", "base"), ("interp", "interp"), ("sr1", "sr1")):
        published, _ = reference(name)
        ours = pixel_unet_config(stage, "paper")
        assert {k: published[k] for k in ours} == ours, stage


def test_published_unet_folder_loads_with_no_missing_or_unexpected_keys(tmp_path):
    """A folder laid out like show-1-base/unet (config with `_class_name: UNet3DConditionModel`)."""
    config, _ = reference("tiny")
    torch.manual_seed(0)
    original = ShowOneUNet3DConditionModel.from_config(config)
    original.save_pretrained(tmp_path / "unet")
    saved = json.loads((tmp_path / "unet" / "config.json").read_text())
    saved["_class_name"] = "UNet3DConditionModel"  # as published
    (tmp_path / "unet" / "config.json").write_text(json.dumps(saved))
    loaded, info = ShowOneUNet3DConditionModel.from_pretrained(tmp_path / "unet", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    for (k1, v1), (k2, v2) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


@pytest.mark.parametrize("stage", ["base", "interp", "sr1"])
def test_tiny_stage_unets_predict_noise_and_variance_per_frame(stage):
    torch.manual_seed(0)
    model = ShowOneUNet3DConditionModel.from_config(pixel_unet_config(stage, "tiny", text_dim=16)).eval()
    channels = model.config.in_channels
    sample = torch.randn(2, channels, 5, 16, 24)
    labels = torch.tensor([250, 100]) if stage == "sr1" else None
    with torch.no_grad():
        out = model(sample, torch.tensor([10, 900]), torch.randn(2, 7, 16), class_labels=labels).sample
    assert out.shape == (2, 6, 5, 16, 24) and torch.isfinite(out).all()


def test_sr1_unet_requires_the_noise_level():
    model = ShowOneUNet3DConditionModel.from_config(pixel_unet_config("sr1", "tiny", text_dim=16)).eval()
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(1, 6, 2, 16, 16), 10, torch.randn(1, 4, 16))


def tiny_2d_unet() -> UNet2DConditionModel:
    config, _ = reference("tiny")
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transfromer_in_opt"}
    config["down_block_types"] = [b.replace("3D", "2D") for b in config["down_block_types"]]
    config["up_block_types"] = [b.replace("3D", "2D") for b in config["up_block_types"]]
    config["mid_block_type"] = "UNetMidBlock2DSimpleCrossAttn"
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def test_inflated_model_is_the_image_model_applied_per_frame():
    unet_2d = tiny_2d_unet()
    unet_3d = ShowOneUNet3DConditionModel.from_2d(unet_2d).eval()
    frame = torch.randn(1, 3, 1, 40, 64)
    video = frame.repeat(1, 1, 4, 1, 1)  # identical frames
    text = torch.randn(1, 7, 32)
    with torch.no_grad():
        out_3d = unet_3d(video, 300, text).sample
        out_2d = unet_2d(frame[:, :, 0], 300, text).sample
    for f in range(4):
        torch.testing.assert_close(out_3d[:, :, f], out_2d, atol=1e-5, rtol=1e-5)
    # Spatial weights are copied 1:1.
    assert torch.equal(unet_3d.state_dict()["down_blocks.1.attentions.0.to_q.weight"],
                       unet_2d.state_dict()["down_blocks.1.attentions.0.to_q.weight"])


def test_inflation_from_a_saved_2d_folder(tmp_path):
    tiny_2d_unet().save_pretrained(tmp_path / "unet2d")
    model = ShowOneUNet3DConditionModel.from_2d(tmp_path / "unet2d")
    assert model.config.down_block_types == ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = ShowOneUNet3DConditionModel.from_config(pixel_unet_config("base", "tiny", text_dim=16))
    model.train()
    for module in model.modules():  # dropout off, so both passes are comparable
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    sample, text = torch.randn(1, 3, 3, 16, 16), torch.randn(1, 5, 16)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.set_gradient_checkpointing(checkpointing)
        model(sample, 10, text).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for plain, checkpointed in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(plain, checkpointed)


def test_stage_components_name_what_each_stage_pipeline_loads():
    from show1.models.configs import STAGE_COMPONENTS, STAGES
    from show1.pipelines.cascade import STAGE_PIPELINES

    assert tuple(STAGE_COMPONENTS) == STAGES
    for stage, pipeline in STAGE_PIPELINES.items():
        assert set(STAGE_COMPONENTS[stage]) == set(pipeline.loaders), stage


def test_show1_register_imports_no_model_library(tmp_path):
    import subprocess
    import sys

    from show1.models.text import tiny_text_encoder_dir

    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "model_index.json").write_text("{}")
    # Importing the registration, and assembling a model folder that bundles the packaged (flat) MiniLM encoder.
    code = ("import sys\nfrom pathlib import Path\nfrom show1.registry.register import assemble_model_folder\n"
            "stage, encoder, target = map(Path, sys.argv[1:])\n"
            "assemble_model_folder(stage, [], encoder, target)\n"
            "print(sorted(m for m in ('diffusers', 'transformers', 'torch', 'show1.pipelines') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code, str(tmp_path / "stage"), str(tiny_text_encoder_dir()),
                             str(tmp_path / "model")], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip() == "[]"  # registration stays a few seconds: no model code is imported for it
    assert (tmp_path / "model" / "text_encoder" / "model.safetensors").is_file()
