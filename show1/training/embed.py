"""`show1 embed`: every distinct caption of a curated folder through the text encoder once, into an embedding store
(show1.data.text_embeddings) that base, interp and sr1 training then read instead of loading the encoder.

The same `TextEncoder.encode` embeds the captions when training starts without a store, so both give the same
tensors: each batch holds exactly `batch_size` prompts (the last one filled with empty prompts), every prompt padded
to the encoder's max length, so a caption's numbers do not depend on which captions share its batch (a batch's shape
can change the last bits; its other rows do not). The encoder runs in float32 on the CPU and in the stored dtype on
a GPU; the real tokens' outputs are rounded to the stored dtype (bf16 by default, fp16 as an option).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from show1.data.clip_index import INDEX_PARQUET, ClipIndex
from show1.data.text_embeddings import (
    DTYPES,
    EmbeddingStore,
    StoreError,
    StoreInfo,
    StoreWriter,
    default_root,
    encoder_key,
)
from show1.models.text_layout import tiny_text_encoder_dir
from show1.provenance import file_digest

DEFAULT_DTYPE = "bf16"
DEFAULT_BATCH = 16  # prompts per encoder call; the stored numbers are the same for every caption of a run


@dataclass
class TextEncoder:
    """A loaded text encoder that embeds captions as the store keeps them: real tokens only, in `dtype`."""

    tokenizer: object
    model: torch.nn.Module | None  # None once the `text_encoder` block has ended
    device: torch.device
    dtype: str
    max_length: int
    dim: int

    def encode(self, captions: list[str], batch_size: int = DEFAULT_BATCH) -> Iterator[tuple[str, torch.Tensor]]:
        """(caption, its real tokens (n, D) on the host in the stored dtype), in the order of `captions`."""
        from show1.models import text

        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            filled = chunk + [""] * (batch_size - len(chunk))  # always the same batch shape
            tokens = text.encode_tokens(self.tokenizer, self.model, filled, self.max_length, self.device)
            for caption, rows in zip(chunk, tokens, strict=False):
                yield caption, rows.to("cpu", DTYPES[self.dtype]).clone()


def compute_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """float32 on the CPU (bf16 matmuls are slow or emulated there), the stored dtype on a GPU."""
    return DTYPES[dtype] if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def text_encoder(encoder_dir: Path | str, dtype: str = DEFAULT_DTYPE,
                 device: torch.device | str | None = None) -> Iterator[TextEncoder]:
    """The encoder in `encoder_dir` on `device` (a GPU when there is one), freed when the block ends so that a
    paper-size encoder (T5-XXL) never sits on the device beside the UNet."""
    from show1.models import text  # transformers: only when there is something to embed

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer, model = text.load_text_encoder(encoder_dir, torch_dtype=compute_dtype(device, dtype))
    model.requires_grad_(False).eval().to(device)
    encoder = TextEncoder(tokenizer, model, device, dtype, text.context_length(tokenizer), model.config.hidden_size)
    del model
    try:
        yield encoder
    finally:
        encoder.model = None  # whoever still holds `encoder` does not keep the weights alive
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def curated_digest(data_dir: Path | str) -> str:
    """The sha256 of a curated folder's index: what a store records as covered once all its captions are in."""
    return file_digest(Path(data_dir) / INDEX_PARQUET)


@dataclass
class EmbedReport:
    store: Path
    encoder_key: str
    captions: int  # distinct captions of the folder, the empty prompt included
    added: int  # embedded by this call (0: the store held them all)
    stored: int  # captions in the store now


def embed_folder(data_dir: Path | str, encoder_dir: Path | str | None = None, root: Path | str | None = None,
                 dtype: str = DEFAULT_DTYPE, batch_size: int = DEFAULT_BATCH, device: torch.device | str | None = None,
                 on_start: Callable[[int], object] | None = None,
                 on_caption: Callable[[], object] | None = None) -> EmbedReport:
    """Store every distinct caption of the curated folder `data_dir` (both splits) and the empty prompt of
    classifier-free guidance, embedded by `encoder_dir` (default: the tiny profile's encoder, as training's), in
    `root`/<encoder key>/ (default: `data_dir`/embeddings). Only the captions the store lacks are embedded; when it
    has them all the encoder is not loaded and nothing is written. `on_start(n)` is told how many will be embedded,
    `on_caption()` is called after each."""
    if "://" in str(data_dir):
        raise ValueError(f"--data {data_dir}: show1 embed reads a curated folder on this machine; streaming from an "
                         "object store is not supported yet (copy the folder down first)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: at least 1")
    data_dir = Path(data_dir)
    encoder_dir = Path(encoder_dir or tiny_text_encoder_dir())
    captions = list(dict.fromkeys([*ClipIndex(data_dir).captions(), ""]))
    digest = curated_digest(data_dir)
    key = encoder_key(encoder_dir)
    folder = Path(root or default_root(data_dir)) / key
    with StoreWriter.open(folder) as writer:
        if writer.info is not None and writer.info.dtype != dtype:
            raise StoreError(f"{folder} holds {writer.info.dtype} embeddings, not {dtype}: pass --dtype "
                             f"{writer.info.dtype}, or remove the folder to store {dtype}")
        missing = writer.missing(captions)
        if on_start:
            on_start(len(missing))
        if missing:
            with text_encoder(encoder_dir, dtype, device) as encoder:
                writer.start(StoreInfo(key, str(encoder_dir.resolve()), encoder.dim, encoder.max_length, dtype,
                                       batch_size))
                for caption, tokens in encoder.encode(missing, batch_size):
                    writer.add(caption, tokens)
                    if on_caption:
                        on_caption()
        writer.finish()  # the index names every caption before the folder is recorded as covered
        writer.mark_covered(digest)
    return EmbedReport(folder, key, len(captions), len(missing), len(EmbeddingStore(folder)))
