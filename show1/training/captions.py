"""The captions as the trainer feeds them to the UNet: each caption's real tokens followed by zeros up to the text
encoder's max length, (B, max_length, D) in float32.

Where the real tokens come from:
- stored: STORE/<key of the encoder training would use>/ (`show1 embed`, show1.data.text_embeddings) when it holds
  every caption of the split and the empty prompt. The text encoder is never loaded; the store is opened
  memory-mapped and read a batch at a time, so the process's memory does not grow with the number of captions.
- at start: otherwise (small sets) the encoder runs over every distinct caption of the split and the empty prompt
  once, before the UNet is built, and is freed; the real tokens are kept in host memory. The same code as
  `show1 embed`, in batches of the same shape, rounded to the same dtype: the same tensors as stored ones (on the
  same device), so a run that reads a store and one that embeds at start train alike, bit for bit.

Known difference from inference: the pipelines feed the UNet the text encoder's whole output, its values at the pad
positions included; training feeds zeros at the pad positions (only real tokens are stored: ~20 of T5's 77 for a
WebVid caption, a quarter of the bytes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from show1.data.text_embeddings import EmbeddingStore, default_root, encoder_key
from show1.provenance import file_digest
from show1.training.embed import DEFAULT_BATCH, DEFAULT_DTYPE, curated_digest, text_encoder

logger = logging.getLogger(__name__)
AT_START = "embedded at train start"


@dataclass
class CaptionEmbeddings:
    """Caption → the UNet's text input (max_length, D): real tokens from `tokens`, zeros after them."""

    tokens: Callable[[str], torch.Tensor]  # caption -> its real tokens (n, D)
    dim: int
    max_length: int
    source: dict[str, str] = field(default_factory=dict)  # for the training run: encoder key, where they came from

    def __post_init__(self) -> None:
        self.empty = self([""])[0]  # the dropped captions' input (classifier-free guidance), looked up once

    def __call__(self, captions: list[str]) -> torch.Tensor:
        batch = torch.zeros(len(captions), self.max_length, self.dim)
        for row, caption in enumerate(captions):
            real = self.tokens(caption)
            batch[row, :len(real)] = real.float()
        return batch

    def lookup(self, captions: list[str], dropped: torch.Tensor) -> torch.Tensor:
        """The batch's embeddings, the empty prompt's where the caption was dropped (classifier-free guidance)."""
        return torch.where(dropped[:, None, None], self.empty, self(captions))


def caption_embeddings(data_dir: Path | str, captions: Callable[[], list[str]], encoder_dir: Path,
                       root: Path | None, device: torch.device | str,
                       index_file: Path | None = None) -> CaptionEmbeddings:
    """The split's caption embeddings: read from the store of `encoder_dir` under `root` (default: beside the
    clips of a local folder) when it covers the curated folder (or holds each of `captions()`), else embedded now
    on `device`. `index_file`: the local copy of the index of a folder at a URL."""
    key = encoder_key(encoder_dir)
    streamed = "://" in str(data_dir)
    store = None
    if root is not None or not streamed:  # stores are local folders: a streamed data set names one (--embeddings)
        store = EmbeddingStore.find(Path(root or default_root(data_dir)), key)
    wanted: list[str] | None = None
    if store is not None:
        digest = file_digest(index_file) if index_file else curated_digest(data_dir)
        if store.covers(digest):  # recorded by show1 embed: no caption is listed or hashed here
            return from_store(store)
        wanted = [*captions(), ""]
        absent = store.missing(wanted)
        if not absent:
            return from_store(store)
        logger.warning("%s lacks %d of the split's %d captions: embedding them all at train start (run show1 embed "
                       "to store them)", store.folder, len(absent), len(wanted))
    made_like = (store.info.dtype, store.info.batch_size) if store else (DEFAULT_DTYPE, DEFAULT_BATCH)
    return embed_at_start(wanted or [*captions(), ""], encoder_dir, key, device, *made_like)


def from_store(store: EmbeddingStore) -> CaptionEmbeddings:
    logger.info("captions: %d stored in %s (the text encoder is not loaded)", len(store), store.folder)
    return CaptionEmbeddings(store.tokens, store.info.dim, store.info.max_length,
                             {"text_encoder_key": store.info.encoder_key, "text_embeddings": str(store.folder)})


def embed_at_start(captions: list[str], encoder_dir: Path, key: str, device: torch.device | str,
                   dtype: str = DEFAULT_DTYPE, batch_size: int = DEFAULT_BATCH) -> CaptionEmbeddings:
    """Embed every distinct caption (and the empty prompt) once with the encoder in `encoder_dir` on `device`, as
    `show1 embed` would store them, then free the encoder."""
    distinct = list(dict.fromkeys([*captions, ""]))
    with text_encoder(encoder_dir, dtype, device) as encoder:
        table = dict(encoder.encode(distinct, batch_size))
        dim, max_length = encoder.dim, encoder.max_length
    return CaptionEmbeddings(table.__getitem__, dim, max_length, {"text_encoder_key": key, "text_embeddings": AT_START})
