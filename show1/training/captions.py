"""The training captions, embedded once: the text encoder runs over every distinct caption of the split (and the
empty prompt of classifier-free guidance) before the UNet is built, and is freed, so a paper-size encoder (T5-XXL,
~19 GB in fp32) never sits on the device beside the UNet. The table lives in host memory, in the training dtype's
precision (bf16/fp16 when mixed precision is on): ~0.6 MB per caption with T5-XXL in bf16, so a few thousand
captions per GB; a WebVid-scale caption set wants embeddings precomputed to disk (not built yet).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from show1.models.text import encode_prompt, load_text_encoder

CHUNK = 64  # captions per encoder call


@dataclass
class CaptionEmbeddings:
    """Caption → per-token embeddings (77, D), on the host."""

    table: dict[str, torch.Tensor]
    dim: int

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return torch.stack([self.table[c] for c in captions]).float()

    def lookup(self, captions: list[str], dropped: torch.Tensor) -> torch.Tensor:
        """The batch's embeddings, the empty prompt's where the caption was dropped (classifier-free guidance)."""
        return torch.where(dropped[:, None, None], self([""])[0], self(captions))


def embed_captions(encoder_dir: Path, captions: list[str], device: torch.device | str,
                   dtype: torch.dtype | None = None) -> CaptionEmbeddings:
    """Embed every distinct caption once with the encoder in `encoder_dir` (loaded in `dtype`, on `device`), then
    free the encoder."""
    tokenizer, encoder = load_text_encoder(encoder_dir, torch_dtype=dtype)
    encoder.requires_grad_(False).eval().to(device)
    distinct = list(dict.fromkeys(captions))
    table: dict[str, torch.Tensor] = {}
    for start in range(0, len(distinct), CHUNK):
        chunk = distinct[start:start + CHUNK]
        vectors = encode_prompt(tokenizer, encoder, chunk).to("cpu", dtype or torch.float32)
        table.update(zip(chunk, vectors, strict=True))
    dim = encoder.config.hidden_size
    del encoder
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return CaptionEmbeddings(table, dim)
