"""The paper-size cascade from nothing: random text encoders at the published shapes with tokenizers trained here,
and stage models built on a device with their schedulers on the CPU. Shapes only (the "meta" device holds no
memory): the weights themselves need a GPU machine (benchmarks/bench_inference.py --profile paper)."""

from __future__ import annotations

import pytest
import torch

from show1.models.random_text import random_text_encoder, save_text_encoder
from show1.models.text import encode_prompt, load_text_encoder
from show1.pipelines.weights import build_stage


def parameters(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def test_random_text_encoders_have_the_published_shapes_and_tokenizers_built_here():
    tokenizer, t5 = random_text_encoder("t5", torch.bfloat16, "meta")
    assert t5.config.d_model == 4096 and t5.dtype == torch.bfloat16
    assert parameters(t5) == pytest.approx(4.762, abs=0.001)  # T5-XXL's encoder (google/t5-v1_1-xxl)
    ids = tokenizer("A red kite over a beach", padding="max_length", max_length=77, truncation=True)
    assert len(ids["input_ids"]) == 77 and ids["input_ids"][ids["attention_mask"].index(0) - 1] == 1  # </s>
    assert set(ids["input_ids"][sum(ids["attention_mask"]):]) == {0}  # <pad>

    tokenizer, clip = random_text_encoder("clip", torch.bfloat16, "meta")
    assert clip.config.hidden_size == 1024 and clip.config.num_hidden_layers == 23
    assert parameters(clip) == pytest.approx(0.340, abs=0.001)  # OpenCLIP-H's text tower (SD 2's text_encoder)
    tokens = tokenizer("a red kite")["input_ids"]
    assert tokens[0] == 0 and tokens[-1] == 2 and len(tokens) > 2  # <|startoftext|> … <|endoftext|>
    with pytest.raises(ValueError, match=r"t5 \| clip"):
        random_text_encoder("bert")


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_a_random_encoder_folder_loads_back_and_encodes(kind, tmp_path):
    small = {"t5": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
             "clip": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}}
    save_text_encoder(tmp_path, *random_text_encoder(kind, overrides=small[kind]))
    tokenizer, encoder = load_text_encoder(tmp_path)
    embeddings = encode_prompt(tokenizer, encoder, ["a red kite over a beach", "two dogs"])
    assert embeddings.shape == (2, 77, 32) and torch.isfinite(embeddings).all()


def test_paper_stages_are_built_on_the_device_with_their_schedulers_on_the_cpu():
    base = build_stage("base", "paper", 4096, device="meta", dtype=torch.bfloat16)
    assert base.unet.device.type == "meta" and base.unet.dtype == torch.bfloat16
    assert parameters(base.unet) == pytest.approx(1.73, abs=0.01)  # the published base UNet
    base.scheduler.set_timesteps(75)  # fails when a scheduler's tensors were made on a GPU
    assert base.scheduler.timesteps.device.type == "cpu" and len(base.scheduler.timesteps) == 75

    sr2 = build_stage("sr2", "paper", 4096, device="meta", dtype=torch.bfloat16)
    _, clip = random_text_encoder("clip", device="meta")
    # sr2 cross-attends to OpenCLIP-H's 1024-d text, not T5's 4096-d: init-weights gives it an encoder of its own.
    assert sr2.unet.config.cross_attention_dim == clip.config.hidden_size == 1024
    assert sr2.vae.device.type == "meta" and sr2.scheduler.alphas_cumprod.device.type == "cpu"
