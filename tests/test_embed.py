"""`show1 embed` and the trainer's captions: the real tiny encoder over the curated demo clips, stores in tmp dirs.

A store is written once and read by training instead of the encoder; a rerun does nothing, a changed encoder makes a
new store, and a run that reads the store trains bit for bit like one that embeds at start."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import curated_one_clip
from typer.testing import CliRunner

from show1.cli import app
from show1.data.clip_index import ClipIndex
from show1.data.text_embeddings import EmbeddingStore, StoreError, StoreWriter, encoder_key
from show1.models import text
from show1.models.text_layout import tiny_text_encoder_dir
from show1.training.captions import AT_START, caption_embeddings, embed_at_start, from_store
from show1.training.embed import embed_folder, text_encoder
from show1.training.trainer import train


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo clips curated at a quarter of the tiny sizes; half the captions dropped in training, so the empty
    prompt's embedding is read too; no sample videos (minutes on 2 cores)."""
    return curated_one_clip(tmp_path_factory.mktemp("embed"), {"train": {"caption_dropout": 0.5, "sample_every": 0}})


def linked(curated: Path, target: Path) -> Path:
    """A curated folder of its own (its files linked to `curated`'s), so a store written beside its clips is this
    test's alone."""
    target.mkdir()
    for item in curated.iterdir():
        if item.name != "embeddings":
            (target / item.name).symlink_to(item)
    return target


def files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")
            if p.is_file()}


@pytest.fixture
def no_encoder(monkeypatch):
    """Loading a text encoder fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(text, "load_text_encoder", refuse)


def test_embed_stores_each_caption_once_and_a_rerun_does_nothing(demo, tmp_path, request):
    folder, _ = demo
    data = linked(folder / "curated", tmp_path / "data")
    first = embed_folder(data)
    captions = ClipIndex(data).captions()
    assert first.store == data / "embeddings" / encoder_key(tiny_text_encoder_dir())
    assert first.added == first.captions == first.stored == len(set(captions)) + 1  # and the empty prompt
    store = EmbeddingStore(first.store)
    assert store.missing([*captions, ""]) == [] and store.info.dtype == "bf16" and store.info.dim == 384
    assert len(list((first.store / "parts").iterdir())) == 1  # many captions per file
    before = files(first.store)
    request.getfixturevalue("no_encoder")
    again = embed_folder(data)
    assert again.added == 0 and again.stored == first.stored
    assert files(first.store) == before  # nothing written


def test_new_captions_are_added_and_a_killed_run_is_resumed_without_embedding_twice(tmp_path):
    folder = tmp_path / "store"
    rows = {f"caption {i}": torch.randn(i + 1, 8) for i in range(6)}
    with StoreWriter.open(folder) as writer:
        writer.start(_info(8))
        for caption in list(rows)[:3]:
            writer.add(caption, rows[caption])
    with pytest.raises(KeyboardInterrupt), StoreWriter.open(folder) as writer:  # killed after a part, before the index
        for caption in list(rows)[3:5]:
            writer.add(caption, rows[caption])
        writer._flush()
        raise KeyboardInterrupt
    assert len(EmbeddingStore(folder)) == 3  # the index did not name the new part yet
    with StoreWriter.open(folder) as writer:  # the next writer folds the finished part in
        assert writer.missing(list(rows)) == ["caption 5"]
        writer.add("caption 5", rows["caption 5"])
    store = EmbeddingStore(folder)
    assert len(store) == 6 and len(list((folder / "parts").iterdir())) == 3
    for caption, tokens in rows.items():
        assert torch.equal(store.tokens(caption), tokens.to(torch.bfloat16))
    with pytest.raises(KeyError, match="run show1 embed"):
        store.tokens("never stored")

    # A damaged part is named; removed, its captions are embedded again and the others are kept.
    damaged = folder / "parts" / "part-000000.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"part-000000\.safetensors: damaged"):
        EmbeddingStore(folder).tokens("caption 0")
    damaged.unlink()
    with StoreWriter.open(folder) as writer:
        assert writer.missing(list(rows)) == ["caption 0", "caption 1", "caption 2"]
    assert torch.equal(EmbeddingStore(folder).tokens("caption 5"), rows["caption 5"].to(torch.bfloat16))


def _info(dim: int):
    from show1.data.text_embeddings import StoreInfo

    return StoreInfo("k" * 64, "encoder", dim, 77, "bf16", 16)


def test_a_changed_encoder_makes_a_new_store(demo, tmp_path):
    folder, _ = demo
    data = linked(folder / "curated", tmp_path / "data")
    original = embed_folder(data)
    changed = tmp_path / "encoder"
    shutil.copytree(tiny_text_encoder_dir(), changed, ignore=shutil.ignore_patterns("__pycache__"))
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps(config | {"show1_note": "fine-tuned"}))
    before = files(original.store)
    other = embed_folder(data, changed)
    assert other.store.parent == original.store.parent and other.store != original.store
    assert other.added == original.added and files(original.store) == before
    assert EmbeddingStore(other.store).info.encoder == str(changed.resolve())


def test_stored_embeddings_are_the_train_start_ones_real_tokens_then_zeros(demo, tmp_path):
    folder, _ = demo
    data = folder / "curated"
    captions = [*ClipIndex(data, "train").captions(), ""]
    report = embed_folder(data, root=tmp_path / "stores")
    stored = from_store(EmbeddingStore(report.store))
    at_start = embed_at_start(captions, tiny_text_encoder_dir(), report.encoder_key, "cpu")
    assert stored.source["text_encoder_key"] == at_start.source["text_encoder_key"] == report.encoder_key
    assert torch.equal(stored(captions), at_start(captions))  # bit for bit
    with text_encoder(tiny_text_encoder_dir()) as encoder:
        full = text.encode_prompt(encoder.tokenizer, encoder.model, captions)
        counts = encoder.tokenizer(captions, padding=False)["attention_mask"]
    batch = stored(captions)
    assert batch.shape == (len(captions), 77, 384)
    for row, mask in enumerate(counts):
        n = sum(mask)
        assert torch.equal(batch[row, n:], torch.zeros(77 - n, 384))  # zeros at the pad positions
        # the encoder's own outputs at the real tokens, rounded to bf16 (inference keeps the pad positions' too)
        torch.testing.assert_close(batch[row, :n], full[row, :n], rtol=2**-7, atol=1e-3)


def test_a_store_without_some_captions_is_not_used(demo, tmp_path):
    folder, _ = demo
    key = encoder_key(tiny_text_encoder_dir())
    with StoreWriter.open(tmp_path / "stores" / key) as writer:
        writer.start(_info(384))
        writer.add("", torch.zeros(2, 384))
    embeddings = caption_embeddings(folder / "curated", ClipIndex(folder / "curated", "train").captions,
                                    tiny_text_encoder_dir(), tmp_path / "stores", "cpu")
    assert embeddings.source["text_embeddings"] == AT_START


def test_training_reads_the_store_without_loading_the_encoder_and_trains_alike(demo, tmp_path, request,
                                                                              mlflow_store):
    from mlflow.tracking import MlflowClient

    from show1.registry.lineage import lineage

    folder, params = demo
    data = linked(folder / "curated", tmp_path / "data")
    at_start = train("base", data, tmp_path / "at-start", params, max_steps=2)
    report = embed_folder(data)
    request.getfixturevalue("no_encoder")
    stored = train("base", data, tmp_path / "stored", params, max_steps=2)
    assert stored.losses == at_start.losses  # bit for bit, dropped captions included

    client = MlflowClient(tracking_uri=mlflow_store)
    runs = {Path(r.data.tags["run_dir"]).name: r
            for r in client.search_runs([client.get_experiment_by_name(params.tracking.experiment).experiment_id])}
    assert runs["stored"].data.params["text_embeddings"] == str(report.store)
    assert runs["at-start"].data.params["text_embeddings"] == AT_START
    assert runs["stored"].data.tags["text_encoder_key"] == runs["at-start"].data.tags["text_encoder_key"] \
        == report.encoder_key
    facts = lineage(params, runs["stored"].info.run_id).facts
    assert facts["text_encoder_key"] == report.encoder_key and facts["param text_embeddings"] == str(report.store)


runner = CliRunner()


def test_embed_cli_reports_then_refuses_bad_input_in_one_line(demo, tmp_path):
    folder, _ = demo
    data = linked(folder / "curated", tmp_path / "data")

    def embed(*args: str):
        return runner.invoke(app, ["--params", str(folder / "params.yaml"), "embed", *args])

    done = embed("--data", str(data), "--quiet")
    assert done.exit_code == 0, done.output
    assert "caption(s) embedded, 0 already stored" in done.output and str(data / "embeddings") in done.output
    for args, message in [
        (("--data", "s3://bucket/curated"), "not supported yet"),
        (("--data", str(tmp_path / "nope")), "folder not found"),
        (("--data", str(tmp_path)), "index.parquet not found"),
        (("--data", str(data), "--dtype", "fp32"), "not one of bf16, fp16"),
        (("--data", str(data), "--text-encoder", str(tmp_path / "nope")), "--text-encoder"),
        (("--data", str(data), "--dtype", "fp16"), "holds bf16 embeddings, not fp16: pass --dtype bf16"),
        (("--data", str(data), "--batch-size", "0"), "--batch-size"),
    ]:
        result = embed(*args, "--quiet")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
        assert result.output.count("error:") == 1
