"""Text encoders with random weights at the published shapes, for a paper-size cascade that runs from nothing (no
download): T5-XXL's encoder for the pixel stages (4096-d, what Show-1's DeepFloyd-IF stages cross-attend to) and
the OpenCLIP-H text tower for sr2 (1024-d, zeroscope's / Stable Diffusion 2's `text_encoder`). Their tokenizers
are trained here, on the shipped prompt sets: a small vocabulary (the embedding tables keep the published sizes;
the unused rows cost nothing at run time). Timing and memory are the real encoders'; the embeddings mean nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from show1.models.text import MAX_LENGTH

# google/t5-v1_1-xxl (DeepFloyd IF's text_encoder/config.json), encoder only: ~4.76 B parameters.
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
          "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
          "pad_token_id": 0, "eos_token_id": 1}
# stabilityai/stable-diffusion-2 text_encoder/config.json (OpenCLIP ViT-H/14's text tower, penultimate layer, as
# zeroscope_v2_XL and Show-1's sr2 use it): ~340 M parameters.
OPENCLIP_H = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
              "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512,
              "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's vocabulary
CLIP_SPECIALS = ("<|startoftext|>", "!", "<|endoftext|>")  # ids 0, 1 (CLIP pads with "!"), 2


def _corpus() -> list[str]:
    from show1.evaluation.prompts import SHIPPED

    lines = []
    for path in sorted(SHIPPED.glob("*.txt")):
        lines += [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def build_tokenizer(kind: str) -> Any:
    """A fast tokenizer trained on the shipped prompts: `t5` (unigram, ends with </s>, pads with <pad>) or `clip`
    (byte-level BPE between <|startoftext|> and <|endoftext|>), both with a 77-token context."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "t5":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        tokenizer.train_from_iterator(_corpus(), trainers.UnigramTrainer(
            vocab_size=2000, special_tokens=list(T5_SPECIALS), unk_token="<unk>"))
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=MAX_LENGTH, pad_token="<pad>",
                                       eos_token="</s>", unk_token="<unk>")
    if kind == "clip":
        tokenizer = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.train_from_iterator(_corpus(), trainers.BpeTrainer(
            vocab_size=2000, special_tokens=list(CLIP_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=MAX_LENGTH, pad_token="!",
                                       bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    raise ValueError(f"unknown tokenizer kind {kind!r} (t5 | clip)")


def random_text_encoder(kind: str, dtype: Any = None, device: Any = None,
                        overrides: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(tokenizer, encoder) with random weights: `t5` at T5-XXL's shape, `clip` at OpenCLIP-H's text tower's,
    built directly in `dtype` on `device` (T5-XXL is ~9.5 GB in bfloat16, ~19 GB in float32; "meta": shapes
    only). `overrides` change the config (smaller copies for tests)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if kind == "t5":
        config, cls = T5Config(**(T5_XXL | (overrides or {}))), T5EncoderModel
    elif kind == "clip":
        config, cls = CLIPTextConfig(**(OPENCLIP_H | (overrides or {}))), CLIPTextModel
    else:
        raise ValueError(f"unknown text encoder kind {kind!r} (t5 | clip)")
    with torch.device(device or "cpu"):
        encoder = cls._from_config(config, dtype=dtype or torch.float32)
    return build_tokenizer(kind), encoder.eval()


def save_text_encoder(folder: Path, tokenizer: Any, encoder: Any) -> None:
    """`folder/tokenizer` + `folder/text_encoder` (safetensors), the layout `load_text_encoder` reads."""
    tokenizer.save_pretrained(folder / "tokenizer")
    encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
