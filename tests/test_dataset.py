"""The torch Dataset over curated shards: shapes, values, captions, splits."""

import functools
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from show1.atomic import read_jsonl
from show1.config import Encoding, load_params
from show1.data.curate import curate
from show1.data.dataset import CuratedClips

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_curated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "curated"
    curate(ROOT / "data/manifests/demo.csv", out, load_params(ROOT / "params.yaml"))
    return out


def test_dataset_yields_normalized_frames_and_captions(demo_curated):
    clips = CuratedClips(demo_curated, size="64x40", split="train")
    rows = [r for r in read_jsonl(demo_curated / "index.jsonl") if r["split"] == "train"]
    assert len(clips) == len(rows) == 30
    item = clips[0]
    assert item["frames"].shape == (29, 3, 40, 64) and item["frames"].dtype == torch.float32
    assert -1.0 <= item["frames"].min() < 0 < item["frames"].max() <= 1.0
    assert item["caption"] == rows[0]["caption"] and item["clip_id"] == rows[0]["clip_id"]


@pytest.fixture(scope="module")
def lossless_curated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lossless") / "curated"
    params = load_params(ROOT / "params.yaml")
    lossless = Encoding(codec="libx264rgb", pixel_format="rgb24", crf=0)
    curate(ROOT / "data/manifests/demo.csv", out,
           params.model_copy(update={"curate": params.curate.model_copy(update={"encoding": lossless})}))
    return out


def _clip_hash(per_size: list) -> str:
    """A clip's content hash from its frames at every size (as curation computes it before encoding)."""
    digests = [hashlib.sha256(b"".join(f[k].tobytes() for f in per_size)).digest() for k in range(len(per_size[0]))]
    return hashlib.sha256(b"".join(digests)).hexdigest()


@functools.cache
def _clips(folder: Path, size: str) -> CuratedClips:
    return CuratedClips(folder, size=size, split=None, normalize=False)


def _frames(folder: Path, size: str, index: int):
    return _clips(folder, size)[index]["frames"].permute(0, 2, 3, 1).numpy()


def test_the_lossless_setting_stores_the_curated_frames_bit_for_bit(lossless_curated):
    """With libx264rgb at crf 0 the frames the Dataset decodes hash to the index's content_hash (the frames curation
    made, before encoding), every clip, every size."""
    rows = read_jsonl(lossless_curated / "index.jsonl")
    for i in [*range(0, len(rows), 6), len(rows) - 1]:  # clips of every source, first and last
        row = rows[i]
        assert _clip_hash([_frames(lossless_curated, size, i) for size in ("64x40", "256x160")]) == row["content_hash"]
    large = CuratedClips(lossless_curated, size="256x160", split=None, normalize=False)[0]["frames"]
    assert large.shape == (29, 3, 160, 256) and large.dtype == torch.uint8


def test_the_default_encoding_is_ten_times_smaller_and_above_38_db(demo_curated, lossless_curated):
    """The default (H.264 4:4:4, crf 16): the same clips as the lossless curation, the frames the trainer receives
    within 38 dB PSNR of the curated ones on average at every size, and the shards at least 10x smaller than raw
    frames."""
    rows, exact = read_jsonl(demo_curated / "index.jsonl"), read_jsonl(lossless_curated / "index.jsonl")
    assert [{k: v for k, v in r.items() if k != "shard"} for r in rows] == \
        [{k: v for k, v in r.items() if k != "shard"} for r in exact]
    for size in ("64x40", "256x160"):
        psnr = []
        for i in range(0, len(rows), 3):
            error = (_frames(demo_curated, size, i).astype(np.float64) - _frames(lossless_curated, size, i)) ** 2
            psnr.extend(10 * np.log10(255**2 / np.maximum(error.mean(axis=(1, 2, 3)), 1e-10)))
        print(f"{size}: mean PSNR {np.mean(psnr):.2f} dB over {len(psnr)} frames")
        assert np.mean(psnr) >= 38, (size, np.mean(psnr))
    frames = {(r["tensor"], r["frame_start"] + r["num_frames"]) for r in rows}
    stored_frames = sum(max(end for t, end in frames if t == tensor) for tensor in {t for t, _ in frames})
    raw = stored_frames * (64 * 40 + 256 * 160) * 3
    stored = sum(p.stat().st_size for p in (demo_curated / "shards").glob("*.safetensors"))
    print(f"stored {stored} bytes, raw frames {raw} bytes: {raw / stored:.1f}x smaller")
    assert stored * 10 <= raw, (stored, raw)


def test_dataset_splits_and_loader_batches(demo_curated):
    val = CuratedClips(demo_curated, split="val")
    assert len(val) == 1 and val[0]["clip_id"].startswith("carphone")
    batch = next(iter(DataLoader(CuratedClips(demo_curated), batch_size=4, shuffle=False)))
    assert batch["frames"].shape == (4, 29, 3, 40, 64) and len(batch["caption"]) == 4


def test_dataset_explains_bad_requests(demo_curated, tmp_path):
    with pytest.raises(ValueError, match="576x320"):
        CuratedClips(demo_curated, size="576x320")
    with pytest.raises(ValueError, match="split"):
        CuratedClips(demo_curated, split="test")
    with pytest.raises(FileNotFoundError, match="show1 curate"):
        CuratedClips(tmp_path)


def test_the_columnar_index_holds_the_json_index_and_a_split_reads_no_row_it_does_not_use(demo_curated, tmp_path):
    """index.parquet is index.jsonl as columns: every field of every clip, in order; a Dataset picks its split as row
    numbers, and reads a clip's fields only when the clip is read."""
    import pyarrow.parquet as pq

    rows = read_jsonl(demo_curated / "index.jsonl")
    assert pq.read_table(demo_curated / "index.parquet").to_pylist() == rows
    for split in ("train", "val", None):
        clips = CuratedClips(demo_curated, split=split)
        wanted = [r for r in rows if split is None or r["split"] == split]
        assert [clips[i]["clip_id"] for i in range(len(clips))] == [r["clip_id"] for r in wanted]
        assert clips.captions() == list(dict.fromkeys(r["caption"] for r in wanted))
    with pytest.raises(IndexError):
        CuratedClips(demo_curated, split="val")[1]


def test_a_folder_curated_before_the_columnar_index_says_what_to_run(demo_curated, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(demo_curated, old)
    (old / "index.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"curated by an earlier show1 .*run `show1 curate MANIFEST --out"):
        CuratedClips(old)
    again = curate(ROOT / "data/manifests/demo.csv", old, load_params(ROOT / "params.yaml"))
    assert again.chunks_skipped > 0  # the chunks were reused: only the index was written again
    assert len(CuratedClips(old)) == 30


def test_a_folder_of_raw_frames_from_an_earlier_show1_says_what_to_run(demo_curated, tmp_path):
    """A folder curated before clips were stored compressed (index without the clips format, shards of raw frames) is
    refused in one line that names the command; curating it again makes it readable."""
    import shutil

    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    from show1.data.shards import ShardFormatError, ShardReader

    old = tmp_path / "old"
    shutil.copytree(demo_curated, old)
    table = pq.read_table(old / "index.parquet")
    pq.write_table(table.replace_schema_metadata(None), old / "index.parquet")
    for reader in (CuratedClips, lambda root: CuratedClips(root, split="val")):
        with pytest.raises(ValueError, match=r"earlier show1 .*run `show1 curate MANIFEST --out .*old` again"):
            reader(old)
    shard = next((old / "shards").glob("*.safetensors"))
    save_file({"r0000000/64x40": np.zeros((2, 40, 64, 3), np.uint8)}, str(shard), metadata={"format": "show1-clips-v1"})
    with pytest.raises(ShardFormatError, match="raw frames curated by an earlier show1; curate the folder again"):
        ShardReader(old).frames(shard.relative_to(old).as_posix(), "r0000000/64x40", 0, 1)
    curate(ROOT / "data/manifests/demo.csv", old, load_params(ROOT / "params.yaml"), force=True)
    assert len(CuratedClips(old)) == 30


def test_the_training_view_is_memory_mapped_and_holds_what_the_index_holds(demo_curated, tmp_path):
    """index.arrow (what training opens, memory-mapped) gives every clip's fields as index.parquet does, and its
    columns are the file's own memory (no copy was made)."""
    import shutil

    from show1.data.clip_index import INDEX_VIEW, ClipIndex

    parquet_only = tmp_path / "parquet-only"
    shutil.copytree(demo_curated, parquet_only)
    (parquet_only / INDEX_VIEW).unlink()
    for split in ("train", "val", None):
        view, parquet = ClipIndex(demo_curated, split), ClipIndex(parquet_only, split)
        assert [view.row(i) for i in range(len(view))] == [parquet.row(i) for i in range(len(parquet))]
        assert view.resolutions == parquet.resolutions == ["64x40", "256x160"]
        assert list(view.shard_numbers()) == list(parquet.shard_numbers())
        assert view.captions() == parquet.captions()
    view = ClipIndex(demo_curated)
    view.mapped.seek(0)
    start = view.mapped.read_buffer(1).address  # zero-copy: where the file is mapped
    for name in ("caption", "clip_id", "frame_start"):  # each column's values are the mapped file's own bytes
        values = view.table[name].chunks[0].buffers()[-1]
        assert start <= values.address < start + view.mapped.size(), name
    assert ClipIndex(parquet_only).mapped is None
