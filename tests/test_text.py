"""Text encoders from local folders: the tiny profile's real MiniLM and a T5 (the paper profile's kind)."""

import shutil
from pathlib import Path

import pytest
import torch

from show1.models.text import encode_prompt, load_text_encoder, masks_padding, tiny_text_encoder_dir
from show1.models.text_layout import write_stage_layout

CORPUS = ("a red kite flies over a sandy beach", "a man in a suit talks in the back seat of a car",
          "cyclists wait at a crossing in the city", "a fluffy rabbit stretches on a grassy hill",
          "waves roll onto the shore at sunset", "a dog runs across a green field")


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> Path:
    """A tiny T5 encoder with a sentencepiece vocabulary trained here, saved like a published stage folder."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = tmp_path_factory.mktemp("t5")
    text = folder / "corpus.txt"
    text.write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "spiece"), vocab_size=48,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (folder / "tokenizer").mkdir()
    (folder / "spiece.model").rename(folder / "tokenizer" / "spiece.model")
    # T5Tokenizer(vocab_file=…) silently ignores the file in transformers 5 (see STACK.md): load from the folder.
    tokenizer = T5Tokenizer.from_pretrained(folder / "tokenizer", extra_ids=0)
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5EncoderModel(config).save_pretrained(folder / "text_encoder")
    return folder


def test_t5_folder_loads_as_an_encoder_and_embeds_prompts(t5_folder):
    tokenizer, encoder = load_text_encoder(t5_folder)
    assert type(encoder).__name__ == "T5EncoderModel" and masks_padding(encoder)
    embeddings = encode_prompt(tokenizer, encoder, ["a red kite over the beach", ""])
    assert embeddings.shape == (2, 77, 32)
    ids = tokenizer(["a red kite"]).input_ids[0]
    assert tokenizer.unk_token_id not in ids[:-1]  # the trained vocabulary is really used


def test_tiny_profile_encoder_is_the_packaged_minilm():
    tokenizer, encoder = load_text_encoder(tiny_text_encoder_dir())
    assert encoder.config.hidden_size == 384
    near, far = encode_prompt(tokenizer, encoder, ["a dog runs in a park", "a puppy running on grass"]), \
        encode_prompt(tokenizer, encoder, ["a dog runs in a park", "stock market report"])
    cosine = torch.nn.functional.cosine_similarity
    # A real encoder: related prompts are closer than unrelated ones (mean of the token states).
    assert cosine(near[0].mean(0), near[1].mean(0), dim=0) > cosine(far[0].mean(0), far[1].mean(0), dim=0)


def test_not_a_text_encoder_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_text_encoder(tmp_path)


def test_a_flat_encoder_folder_placed_in_the_stage_layout_embeds_the_same(tmp_path):
    """Registration bundles the packaged MiniLM by placing its files (no transformers import): the stage layout it
    writes loads the same tokenizer and weights as the flat folder the stage trained with."""
    flat = tiny_text_encoder_dir()
    assert write_stage_layout(flat, tmp_path / "stage", shutil.copy2)
    assert sorted(p.name for p in (tmp_path / "stage" / "text_encoder").iterdir()) == ["config.json",
                                                                                      "model.safetensors"]
    assert (tmp_path / "stage" / "tokenizer" / "tokenizer.json").is_file()
    prompts = ["a dog runs in a park", ""]
    expected = encode_prompt(*load_text_encoder(flat), prompts)
    assert torch.equal(encode_prompt(*load_text_encoder(tmp_path / "stage"), prompts), expected)
    # Not placeable file by file (pickled weights only): nothing is written, registration loads and saves instead.
    (tmp_path / "pickled").mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(flat / name, tmp_path / "pickled" / name)
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    assert not write_stage_layout(tmp_path / "pickled", tmp_path / "nothing", shutil.copy2)
    assert not (tmp_path / "nothing").exists()
