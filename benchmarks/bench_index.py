"""Opening the curated index at WebVid scale: the columnar index.parquet against index.jsonl, measured side by side.

    python benchmarks/bench_index.py [--rows 10700000] [--json-rows 1000000] [--batch 8]

Writes a synthetic curated folder: one real shard, and an index of `--rows` clips (WebVid-10M has 10.7 M) with a
distinct caption, clip id and source per clip, shards named as curation names them (16 sources each), 10% `val`.
Then, each in a fresh process, so that its peak resident memory is its own:

- view: `CuratedClips(FOLDER, split="train")` (what a training process opens: the training view index.arrow,
  memory-mapped) and its first batch in a random
  order drawn as the trainer draws it (a torch permutation, not a Python list of 10 M ints, which a DataLoader's
  shuffle would build: +350 MB); seconds and peak resident memory.
- jsonl (the baseline): what a process did before index.parquet, reading index.jsonl into a dict per row and keeping
  the train split, on `--json-rows` rows (the same rows' first part; a 10.7 M-row JSON index is ~7 GB), and the
  same per row scaled to `--rows`.
- parquet: the same as `view`, from index.parquet alone (a folder curated before the training view existed).

Goals (issue 34): open + first batch <= 30 s and <= 1.5 GB resident per training process at 10.7 M rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from show1.config import Encoding
from show1.data.clip_codec import encode_frames
from show1.data.clip_index import INDEX_PARQUET, INDEX_VIEW, ROW_GROUP, SCHEMA, view_bytes
from show1.data.shards import as_tensor, shard_bytes

SIZES = ["64x40", "256x160"]
FRAMES = 29


def write_folder(folder: Path, rows: int, json_rows: int) -> None:
    """The synthetic curated folder: one shard with one source (every clip reads it), the index as Parquet and the
    first `json_rows` rows as JSON lines."""
    rng = np.random.default_rng(0)
    (folder / "shards").mkdir(parents=True)
    frames = {f"r0000000/{size}": rng.integers(0, 256, (FRAMES, *map(int, reversed(size.split("x"))), 3),
                                               dtype=np.uint8) for size in SIZES}
    encoded = {name: as_tensor(encode_frames(f, Encoding(), [0])) for name, f in frames.items()}
    (folder / "shards" / "shard-00000-0123456789abcdef.safetensors").write_bytes(shard_bytes(encoded))
    numbers = np.arange(rows)
    words = np.array(["waves", "a city street", "aerial view of", "forest", "people walking", "sunset over",
                      "close-up of", "a dog running", "snow falling", "timelapse of clouds"])
    captions = [f"{words[i % 10]} {words[(i // 10) % 10]} stock footage number {i}" for i in range(rows)]
    table = pa.Table.from_arrays([
        pa.array(numbers, pa.int64()),
        pa.array([f"{i:08d}-0000" for i in range(rows)]),
        pa.array(captions),
        pa.array([f"videos/{i:08d}.mp4" for i in range(rows)]),
        pa.array([f"{i:08d}" for i in range(rows)]),
        pa.array([f"{i:064x}" for i in range(rows)]),
        pa.array(np.zeros(rows)), pa.array(np.full(rows, FRAMES / 7.5)), pa.array(np.full(rows, 7.5)),
        pa.array(np.full(rows, FRAMES, np.int32)),
        pa.array([SIZES] * rows, pa.list_(pa.string())),
        pa.array(np.full(rows, 596, np.int32)), pa.array(np.full(rows, 336, np.int32)), pa.array(np.full(rows, 25.0)),
        pa.array(["shards/shard-00000-0123456789abcdef.safetensors"] * rows),  # every clip reads the one shard
        pa.array(["r0000000"] * rows),
        pa.array(np.zeros(rows, np.int32)),
        pa.array([f"{i:064x}" for i in range(rows)]),
        pa.array(np.where(numbers % 10 == 0, "val", "train")),
    ], schema=SCHEMA)
    pq.write_table(table, folder / INDEX_PARQUET, row_group_size=ROW_GROUP, compression="zstd", use_dictionary=True)
    (folder / INDEX_VIEW).write_bytes(view_bytes(table))  # the training view, as curation writes it
    with open(folder / "index.jsonl", "w") as out:
        for row in table.slice(0, json_rows).to_pylist():
            out.write(json.dumps(row) + "\n")


# The peak resident size of this process (VmHWM: ru_maxrss would carry over the benchmark's own peak through fork).
PEAK = """
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""
PARQUET = PEAK + """
import sys, time
import torch
from torch.utils.data import default_collate
from show1.data.dataset import CuratedClips
start = time.perf_counter()
clips = CuratedClips(sys.argv[1], split="train")
order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(0))  # as the trainer's DataOrder draws it
batch = default_collate([clips[int(i)] for i in order[:int(sys.argv[2])]])
print(time.perf_counter() - start, peak_mb(), len(clips))
"""
JSONL = PEAK + """
import sys, time
from show1.atomic import read_jsonl
import torch  # what a training process has imported anyway (as BARE)
from show1.data.dataset import CuratedClips
start = time.perf_counter()
rows = [r for r in read_jsonl(sys.argv[1] + "/index.jsonl") if r["split"] == "train"]
print(time.perf_counter() - start, peak_mb(), len(rows))
"""
BARE = PEAK + """
import sys, time
import torch
from show1.data.dataset import CuratedClips
print(0, peak_mb(), 0)
"""


def measure(script: str, *args: str) -> tuple[float, float, int]:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    seconds, rss, count = done.stdout.split()
    return float(seconds), float(rss), int(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_700_000)
    parser.add_argument("--json-rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--folder", type=Path, help="Keep the synthetic folder here (reused when it has the index).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "curated"
        started = time.perf_counter()
        if not (folder / INDEX_PARQUET).is_file():
            write_folder(folder, args.rows, min(args.json_rows, args.rows))
        print(f"wrote a {args.rows:,}-row index in {time.perf_counter() - started:.1f} s: index.parquet "
              f"{(folder / INDEX_PARQUET).stat().st_size / 1e6:.0f} MB, index.jsonl of {args.json_rows:,} rows "
              f"{(folder / 'index.jsonl').stat().st_size / 1e6:.0f} MB")
        _, bare_rss, _ = measure(BARE)
        seconds, rss, count = measure(PARQUET, str(folder), str(args.batch))
        print(f"view, {args.rows:,} rows: open + first batch of {args.batch} in {seconds:.1f} s, peak resident "
              f"{rss:.0f} MB ({rss - bare_rss:.0f} MB above a process that imported torch and show1: {bare_rss:.0f} "
              f"MB); {count:,} train clips")
        parquet_only = folder.parent / "parquet-only"
        parquet_only.mkdir(exist_ok=True)
        for name in (INDEX_PARQUET, "shards"):
            if not (parquet_only / name).exists():
                (parquet_only / name).symlink_to(folder / name)
        p_seconds, p_rss, _ = measure(PARQUET, str(parquet_only), str(args.batch))
        print(f"parquet alone (no training view): {p_seconds:.1f} s, peak resident {p_rss:.0f} MB "
              f"({p_rss - bare_rss:.0f} MB above)")
        json_seconds, json_rss, _ = measure(JSONL, str(folder))
        scale = args.rows / min(args.json_rows, args.rows)
        print(f"jsonl, {args.json_rows:,} rows: read and split in {json_seconds:.1f} s, peak resident {json_rss:.0f} "
              f"MB ({json_rss - bare_rss:.0f} MB above); scaled to {args.rows:,} rows: ~{json_seconds * scale:.0f} s, "
              f"~{(json_rss - bare_rss) * scale / 1024 + bare_rss / 1024:.1f} GB")
        print(f"ratio at {args.rows:,} rows (jsonl scaled / parquet): {json_seconds * scale / seconds:.1f}x the time, "
              f"{((json_rss - bare_rss) * scale + bare_rss) / rss:.1f}x the memory")


if __name__ == "__main__":
    main()
