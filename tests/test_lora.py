"""LoRA fine-tuning (train.lora) on the real demo clips and a real sqlite MLflow store: a tiny base stage trained in
full and registered; LoRA adapters trained on it (only the adapter trains, the base stays as it was, an interrupted
run resumes bit for bit); the adapter registered as a small version naming its base version; and the stage loaded
from the registry generates the frames of the base with the adapter merged by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from conftest import TRAINING_SMALL, curated_one_clip, deep_merge
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from show1.config import load_params
from show1.data.video import to_uint8_frames
from show1.pipelines.cascade import Show1Pipeline
from show1.registry.lineage import lineage
from show1.registry.register import RegistrationError, register_stage
from show1.registry.resolve import load_cascade, resolve, stage_folder
from show1.registry.stage_model import decode_video
from show1.training import lora
from show1.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
LORA = {"rank": 4, "alpha": 8}
PROMPT = "a rabbit on a hill"


# The base version the adapters are registered on lives in the module's store: conftest's `store`.
ONE_STORE_PER_MODULE = True


def params_file(folder: Path, lora_settings: dict | None = None, **train: object) -> Path:
    doc = deep_merge(TRAINING_SMALL, {"paths": {"cache": str(folder / "cache")}, "registry": {"model_prefix": "lora"},
                                      "train": {"sample_every": 0, "checkpoint_every": 2, "lora": lora_settings,
                                                **train}})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(doc))
    return folder / "params.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, store) -> dict:
    """A base stage trained in full (1 step, tracked) and registered as version 1; LoRA adapters trained on it for 3
    steps, once straight and once stopped after 2 and resumed."""
    folder = tmp_path_factory.mktemp("lora")
    curated_one_clip(folder)
    full_params, lora_params = load_params(params_file(folder)), load_params(params_file(folder / "l", LORA))
    data = folder / "curated"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        base = train("base", data, folder / "full", full_params, max_steps=1)
        base_version = register_stage(full_params, "base", base.final)
        straight = train("base", data, folder / "straight", lora_params, max_steps=3, init_from=base.final,
                         track=False)
        train("base", data, folder / "resumed", lora_params, max_steps=2, init_from=base.final, track=False)
        resumed = train("base", data, folder / "resumed", lora_params, max_steps=3, init_from=base.final,
                        resume="latest", track=False)
    return {"folder": folder, "data": data, "base": base, "base_version": base_version, "straight": straight,
            "resumed": resumed, "params": lora_params}


def test_lora_trains_only_the_adapter_and_resumes_bit_exactly(runs):
    straight, resumed, base = runs["straight"], runs["resumed"], runs["base"]
    assert resumed.losses == straight.losses[2:] and len(straight.losses) == 3
    final = straight.final / lora.ADAPTER / lora.WEIGHTS
    assert final.read_bytes() == (resumed.final / lora.ADAPTER / lora.WEIGHTS).read_bytes()

    adapter = load_file(str(final))
    unet_file = base.final / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(str(unet_file))
    trainable, total = sum(t.numel() for t in adapter.values()), sum(t.numel() for t in unet.values())
    assert 0 < trainable < total / 50  # rank 4 on the attention projections: ~1% of the tiny UNet
    assert any(name.endswith("attn1.to_q.lora_A.weight") and "temp_attentions" in name for name in adapter)
    assert any(name.endswith("add_k_proj.lora_B.weight") for name in adapter)  # the text path of IF's attention
    assert all(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # trained away from B = 0

    # No UNet copy in the run: checkpoints and final/ hold the adapter, the base.json naming the base folder.
    checkpoint = straight.run_dir / "checkpoints" / "step-000002"
    assert not (checkpoint / "unet").exists() and not (straight.final / "unet").exists()
    assert load_file(str(checkpoint / "ema.safetensors")).keys() == {f"{i:05d}" for i in range(len(adapter))}
    record = lora.read_base(straight.final)
    assert record["stage"] == "base" and record["source"] == str(base.final)
    assert record["folder_hash"] == lora.integrity.read_seal(base.final)["content_hash"]
    lora.integrity.verify(straight.final, required=True)
    assert sum(p.stat().st_size for p in straight.final.rglob("*") if p.is_file()) < unet_file.stat().st_size / 20


def test_a_registered_adapter_names_its_base_and_loads_as_the_merged_stage(runs, store):
    params, straight = runs["params"], runs["straight"]
    version = register_stage(params, "base", straight.final)
    assert version.created and version.version == "2"
    assert register_stage(params, "base", straight.final).version == "2"  # idempotent by content hash
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    info = client.get_model_version("lora-base", "2")
    assert info.tags["show1.adapter"] == "lora" and info.tags["show1.base_version"] == "1"
    assert info.tags["show1.base_content_hash"] == runs["base_version"].content_hash
    assert info.tags["lora_rank"] == "4" and "LoRA adapter (rank 4) on version 1" in info.description
    tree = lineage(params, "lora-base/2")  # the adapter → the full version it is applied to
    assert tree.facts["adapter"] == "lora"
    assert (tree.children[0].kind, tree.children[0].label) == ("adapter of", "lora-base/1")

    versions = resolve(params, {"base": "2"})
    downloaded = params.paths.cache / "registry" / version.content_hash
    merged = stage_folder(versions["base"], params.paths.cache)
    artifacts = [p for p in (downloaded / "artifacts" / "stage").rglob("*") if p.is_file()]
    assert {p.name for p in artifacts} == {lora.WEIGHTS, lora.CONFIG, lora.BASE_FILE, "checksums.json"}
    assert sum(p.stat().st_size for p in artifacts) < 400_000  # the adapter, not the UNet
    assert merged == downloaded / "merged"

    # The base with the adapter merged by hand: W + alpha / rank · B·A on every adapted layer, the rest as it was.
    base_folder = stage_folder(resolve(params, {"base": "1"})["base"], params.paths.cache)
    weights = load_file(str(base_folder / "unet" / "diffusion_pytorch_model.safetensors"))
    adapter = load_file(str(straight.final / lora.ADAPTER / lora.WEIGHTS))
    by_hand = dict(weights)
    for name in adapter:
        if ".lora_A." in name:
            layer = name.split(".lora_A.")[0]
            by_hand[f"{layer}.weight"] = weights[f"{layer}.weight"] + (
                adapter[f"{layer}.lora_B.weight"] @ adapter[name]) * (LORA["alpha"] / LORA["rank"])
    loaded = load_file(str(merged / "unet" / "diffusion_pytorch_model.safetensors"))
    assert loaded.keys() == weights.keys()
    changed = {name for name in weights if not torch.equal(loaded[name], weights[name])}
    assert changed == {name.split(".lora_A.")[0] + ".weight" for name in adapter if ".lora_A." in name}

    from_registry = load_cascade(params, ("base",), "base=2")
    assert from_registry.sources == {"base": "lora-base/2"}
    frames = from_registry.pipeline(PROMPT, seed=3, num_inference_steps=2).frames
    manual = Show1Pipeline.from_folders({"base": base_folder})
    base_frames = manual(PROMPT, seed=3, num_inference_steps=2).frames
    manual.stages["base"].unet.load_state_dict(by_hand)
    expected = manual(PROMPT, seed=3, num_inference_steps=2).frames
    assert torch.allclose(frames, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(frames, base_frames, atol=1e-6, rtol=0)  # the adapter changed the stage

    # The version as an MLflow pyfunc model: its base version's pipeline with the adapter merged in.
    model = mlflow.pyfunc.load_model("models:/lora-base/2")
    video = model.predict(pd.DataFrame({"prompt": [PROMPT]}), params={"num_inference_steps": 2, "seed": 3}).video[0]
    assert (decode_video(video) == to_uint8_frames(frames[0].permute(1, 0, 2, 3))).all()


def test_lora_refuses_what_it_cannot_do(runs, tmp_path):
    params, data, base = runs["params"], runs["data"], runs["base"]
    with pytest.raises(ValueError, match=r"train\.lora .*--init-from"):
        train("base", data, tmp_path / "a", params, max_steps=1, track=False)
    sharded = load_params(params_file(tmp_path, LORA, fsdp=True))
    with pytest.raises(ValueError, match=r"train\.lora with train\.fsdp"):
        train("base", data, tmp_path / "b", sharded, max_steps=1, init_from=base.final, track=False)
    # A base nobody registered: the adapter cannot be registered either.
    other = load_params(params_file(tmp_path / "o", None)).model_copy(
        update={"registry": params.registry.model_copy(update={"model_prefix": "unregistered"})})
    with pytest.raises(RegistrationError, match="not a registered version of unregistered-base: register it first"):
        register_stage(other, "base", runs["straight"].final)


def test_two_processes_train_the_adapter_like_one(runs):
    """torchrun, 2 CPU processes (gloo), each taking one clip of the global batch of 2: the losses of one process."""
    folder = runs["folder"]
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "show1.cli", "--params", str(folder / "l" / "params.yaml"), "train", "--stage", "base",
                           "--data", str(runs["data"]), "--out", str(folder / "two"), "--max-steps", "2",
                           "--init-from", str(runs["base"].final), "--no-track", "--quiet"],
                          capture_output=True, text=True, timeout=600, cwd=folder,
                          env=env | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (folder / "two" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(runs["straight"].losses[:2], rel=1e-4, abs=1e-4)
    assert lora.is_adapter_folder(folder / "two" / "final")


def test_an_adapter_of_a_registered_version_names_it_and_resumes_only_on_it(runs, tmp_path):
    params, data = runs["params"], runs["data"]
    tuned = train("base", data, tmp_path / "run", params, max_steps=1, init_from="models:/lora-base/1", track=False)
    record = lora.read_base(tuned.final)
    assert record["source"] == "models:/lora-base/1" and record["content_hash"] == runs["base_version"].content_hash
    version = register_stage(params, "base", tuned.final)
    assert version.created and MlflowClient().get_model_version("lora-base", version.version).tags[
        "show1.base_version"] == "1"
    with pytest.raises(ValueError, match="resume with the base the run started from"):
        train("base", data, tmp_path / "run", params, max_steps=2, init_from=runs["base"].final, resume="latest",
              track=False)
