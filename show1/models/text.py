"""Text encoders: loaded from a local folder (T5 for the paper profile, the packaged MiniLM for tiny)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from show1.inputs import shown
from show1.models.text_layout import TINY_TEXT_PACKAGE, tiny_text_encoder_dir  # noqa: F401 (re-exported)

MAX_LENGTH = 77  # IF's (and Show-1's) T5 context
logger = logging.getLogger(__name__)
# The prompts already reported as cut inside a `cuts_reported_once` block; None outside one (each cut is reported).
_reported_cuts: ContextVar[set[str] | None] = ContextVar("show1_reported_cuts", default=None)


@contextlib.contextmanager
def cuts_reported_once() -> Iterator[None]:
    """Inside this block a prompt longer than the text encoder's limit is reported once, however many stages (or
    encoders: sr2 has its own) embed it: a cascade call wraps its stages in it."""
    if _reported_cuts.get() is not None:  # an outer block already counts
        yield
        return
    token = _reported_cuts.set(set())
    try:
        yield
    finally:
        _reported_cuts.reset(token)


def load_text_encoder(folder: Path | str, torch_dtype: torch.dtype | None = None
                      ) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and encoder-only model from `folder` (or `folder/tokenizer` + `folder/text_encoder`)."""
    folder = Path(folder)
    tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    enc_dir = folder / "text_encoder" if (folder / "text_encoder").is_dir() else folder
    if not (enc_dir / "config.json").is_file():
        raise FileNotFoundError(f"{enc_dir}: no config.json, so not a text encoder folder")
    from show1.weight_files import check_safetensors_files, refuse_pickles

    refuse_pickles(enc_dir)
    check_safetensors_files(enc_dir, recursive=False)  # a truncated file: one line naming it, not a traceback
    config = AutoConfig.from_pretrained(enc_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    dtype_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    return tokenizer, encoder_class(config.model_type).from_pretrained(enc_dir, use_safetensors=True, **dtype_kwargs)


def encoder_class(model_type: str) -> type[PreTrainedModel]:
    """The encoder-only class for a config's model_type (T5 → T5EncoderModel, CLIP → CLIPTextModel)."""
    if model_type in ("t5", "umt5", "mt5"):
        from transformers import T5EncoderModel

        return T5EncoderModel
    if model_type in ("clip", "clip_text_model"):
        from transformers import CLIPTextModel

        return CLIPTextModel
    return AutoModel  # e.g. BERT-style encoders such as MiniLM


def reference_text(prompt: str) -> str:
    """A prompt as Show-1's reference feeds it to T5: stripped and lowercased (DeepFloyd IF's `encode_prompt` with
    `clean_caption=False`). T5's vocabulary is cased, so this changes the embeddings."""
    return prompt.lower().strip()


def masks_padding(text_encoder: PreTrainedModel) -> bool:
    """Whether an encoder runs with an attention mask over padding: T5 (IF, Show-1's pixel stages) and BERT do;
    Stable-Diffusion-family pipelines (zeroscope, Show-1's sr2) run CLIP without one unless its config asks."""
    config = getattr(text_encoder, "config", None)
    if getattr(config, "model_type", None) not in ("clip", "clip_text_model"):
        return True
    return bool(getattr(config, "use_attention_mask", False))


def _tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> Any:
    """The prompts as token ids padded to `max_length`, with a logged warning for each prompt cut to fit (once per
    prompt inside `cuts_reported_once`)."""
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                      return_tensors="pt")
    full = tokenizer(prompts, padding=False, truncation=False)["input_ids"]
    reported = _reported_cuts.get()
    for prompt, ids in zip(prompts, full, strict=True):
        if len(ids) > max_length and (reported is None or prompt not in reported):
            logger.warning("prompt %s truncated: %d of its %d tokens cut, the text encoder reads %d", shown(prompt, 60),
                           len(ids) - max_length, len(ids), max_length)
            if reported is not None:
                reported.add(prompt)
    return batch


def context_length(tokenizer: PreTrainedTokenizerBase, max_length: int = MAX_LENGTH) -> int:
    """How many tokens the text encoder reads: `max_length`, or the tokenizer's own limit when it is smaller."""
    return min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)


@torch.no_grad()
def encode_prompt(tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, prompts: list[str],
                  max_length: int = MAX_LENGTH, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-token text embeddings (B, max_length, D), the encoder's outputs at the pad positions included. Prompts
    longer than `max_length` tokens are truncated with a logged warning that names them and how many tokens were
    cut (once per prompt inside `cuts_reported_once`)."""
    hidden, _ = _encode(tokenizer, text_encoder, prompts, max_length, device)
    return hidden.to(dtype=dtype) if dtype is not None else hidden


@torch.no_grad()
def encode_tokens(tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, prompts: list[str],
                  max_length: int = MAX_LENGTH, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Each prompt's embeddings at its real tokens only, (n_tokens, D) per prompt: `encode_prompt`'s rows before
    the padding (the same numbers: the prompts are encoded padded to `max_length` all the same)."""
    hidden, counts = _encode(tokenizer, text_encoder, prompts, max_length, device)
    return [row[:count] for row, count in zip(hidden, counts.tolist(), strict=True)]


def _encode(tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, prompts: list[str], max_length: int,
            device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's last hidden state (B, max_length, D) and each prompt's number of real tokens (B,)."""
    device = device or text_encoder.device
    batch = _tokenize(tokenizer, prompts, context_length(tokenizer, max_length))
    mask = batch.attention_mask.to(device) if masks_padding(text_encoder) else None
    output = text_encoder(input_ids=batch.input_ids.to(device), attention_mask=mask)
    return output.last_hidden_state, batch.attention_mask.sum(dim=1)
