"""The torch Dataset over curated shards: shapes, values, captions, splits."""

import hashlib
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from show1.atomic import read_jsonl
from show1.config import load_params
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


def test_dataset_frames_are_the_indexed_clip_bytes(demo_curated):
    """The bytes the Dataset reads hash to the index's content_hash (all sizes, in order)."""
    small = CuratedClips(demo_curated, size="64x40", split=None, normalize=False)
    large = CuratedClips(demo_curated, size="256x160", split=None, normalize=False)
    for i in (0, len(small) - 1):
        per_size = [ds[i]["frames"].permute(0, 2, 3, 1).contiguous().numpy() for ds in (small, large)]
        frame_digests = [hashlib.sha256(b"".join(f[k].tobytes() for f in per_size)).digest()
                         for k in range(len(per_size[0]))]
        assert hashlib.sha256(b"".join(frame_digests)).hexdigest() == read_jsonl(demo_curated / "index.jsonl")[i][
            "content_hash"]
    assert large[0]["frames"].shape == (29, 3, 160, 256) and large[0]["frames"].dtype == torch.uint8


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
