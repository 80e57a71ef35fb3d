"""How fast one CPU core feeds training from curated shards, and what the stored clips cost and lose.

    python benchmarks/bench_dataloader.py [--folder DIR] [--size 576x320] [--seconds 10] [--s3] [--json OUT]

Without --folder the demo manifest is curated at the paper profile (29 frames at 64x40, 256x160 and 576x320) twice
into a temporary folder: with the default encoding (params.yaml `curate.encoding`) and with the lossless one, whose
frames are the curated frames bit for bit (tests/test_dataset.py). Reported:

- storage: MB per clip stored, against the raw uint8 frames earlier show1 versions stored;
- fidelity: mean PSNR of the frames the trainer receives against the curated (lossless) frames, per size;
- rate, per core: clips per CPU-second of a process pinned to one CPU, torch on one thread (CPU time, so another
  process on the machine does not lower it; the wall-clock rate is reported beside it), for `--size`: `bare`
  decodes every frame of the shards' streams and converts nothing (the codec's own speed),
  `loader` reads clips in a seeded random order through `CuratedClips` as the trainer does (the source's bytes
  from its shard, its frames decoded from the clip's keyframe, RGB, float in [-1, 1]). Both run in the same
  invocation, so their ratio holds on any machine. `--s3` adds the loader on the same folder uploaded to the
  stack's S3 server (moto, on this machine), through a data cache that starts empty.

The demo's sources are a 1280x720 cartoon and a 640x272 street scene; WebVid's are 336x596-ish stock footage, which
x264 compresses less well than a cartoon: read the rates as the decode cost of 576x320 frames, not a WebVid
figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, os, random, sys, tempfile, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import torch
torch.set_num_threads(1)
from show1.config import DataCache
from show1.data.curated_files import CuratedFiles
from show1.data.dataset import CuratedClips
folder, size, seconds, kind = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
files = CuratedFiles(folder, DataCache(limit_gb=4.0), tempfile.mkdtemp(prefix="bench-cache-"))
clips = CuratedClips(folder, size=size, split=None, files=files)
frames_per_clip = clips.index.row(0)["num_frames"]
if kind == "loader":
    order = random.Random(0)
    clips[0]  # opens the shard: not part of the rate
    count, started, wall = 0, time.process_time(), time.perf_counter()
    while time.process_time() - started < seconds:
        item = clips[order.randrange(len(clips))]
        assert item["frames"].dtype == torch.float32
        count += 1
    print(json.dumps({"clips_per_s": count / (time.process_time() - started), "clips": count,
                      "wall_clips_per_s": count / (time.perf_counter() - wall)}))
else:
    import io, av
    from show1.data.shards import ShardReader, tensor_name
    reader = ShardReader(clips.root if files.local else files)
    streams = {(r["shard"], r["tensor"]) for r in (clips.index.row(i) for i in range(len(clips)))}
    encoded = [bytes(reader.encoded(shard, tensor_name(tensor, size))) for shard, tensor in sorted(streams)]
    count, started, wall = 0, time.process_time(), time.perf_counter()
    while time.process_time() - started < seconds:
        for data in encoded:
            with av.open(io.BytesIO(data)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "SLICE"
                count += sum(1 for _ in container.decode(stream))
    elapsed = time.process_time() - started
    print(json.dumps({"clips_per_s": count / frames_per_clip / elapsed, "frames": count,
                      "wall_clips_per_s": count / frames_per_clip / (time.perf_counter() - wall)}))
"""


def curate_demo(out: Path, lossless: bool) -> None:
    params = ROOT / "params.yaml"
    if lossless:  # a copy of params.yaml with the lossless encoding
        import yaml

        doc = yaml.safe_load(params.read_text())
        doc["curate"]["encoding"] = {"codec": "libx264rgb", "pixel_format": "rgb24", "crf": 0, "preset": "medium"}
        params = out.parent / f"params-{out.name}.yaml"
        params.write_text(yaml.safe_dump(doc))
    subprocess.run([sys.executable, "-m", "show1.cli", "--params", str(params), "--profile", "paper", "curate",
                    str(ROOT / "data/manifests/demo.csv"), "--out", str(out), "--quiet"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)


def storage(folder: Path) -> dict[str, float]:
    """MB per clip stored, and what the same clips took as raw uint8 frames (every size, each source's frames once)."""
    import pyarrow.parquet as pq

    index = pq.read_table(folder / "index.parquet", columns=["tensor", "frame_start", "num_frames",
                                                              "resolutions"]).to_pylist()
    ends: dict[str, int] = {}
    for row in index:
        ends[row["tensor"]] = max(ends.get(row["tensor"], 0), row["frame_start"] + row["num_frames"])
    pixels = sum(int(w) * int(h) for w, h in (size.split("x") for size in index[0]["resolutions"]))
    stored = sum(p.stat().st_size for p in (folder / "shards").glob("*.safetensors"))
    return {"clips": len(index), "stored_mb_per_clip": stored / len(index) / 1e6,
            "raw_mb_per_clip": sum(ends.values()) * pixels * 3 / len(index) / 1e6}


def fidelity(folder: Path, exact: Path) -> dict[str, float]:
    """Mean PSNR (dB) of every stored frame against the lossless curation's, per size."""
    import numpy as np

    from show1.data.dataset import CuratedClips

    result = {}
    for size in CuratedClips(folder, split=None).index.resolutions:
        stored = CuratedClips(folder, size=size, split=None, normalize=False)
        reference = CuratedClips(exact, size=size, split=None, normalize=False)
        psnr = []
        for i in range(len(stored)):
            error = (stored[i]["frames"].numpy().astype(np.float64) - reference[i]["frames"].numpy()) ** 2
            psnr.extend(10 * np.log10(255**2 / np.maximum(error.mean(axis=(1, 2, 3)), 1e-10)))
        result[size] = float(np.mean(psnr))
    return result


def rate(folder: Path, size: str, seconds: float, kind: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(folder), size, str(seconds), kind], cwd=ROOT,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def rate_from_s3(folder: Path, scratch: Path, size: str, seconds: float) -> dict[str, float]:
    """The loader's rate on the same folder uploaded to the stack's S3 server (moto, on this machine), read through
    a data cache that starts empty: the first reads wait for their shard's download."""
    from show1.stack import object_store
    from show1.stack.processes import free_port, stop

    service = object_store.start_server("127.0.0.1", free_port(), scratch / "s3.log")
    try:
        object_store.wait_ready(service, timeout=300)
        object_store.ensure_bucket(service.url)
        client = object_store.s3_client(service.url)
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"):
            client.put_object(Bucket=object_store.BUCKET, Key=f"bench/{path.relative_to(folder).as_posix()}",
                              Body=path.read_bytes())
        env = os.environ | object_store.client_env(service.url)
        done = subprocess.run([sys.executable, "-c", MEASURE, f"s3://{object_store.BUCKET}/bench", size,
                               str(seconds), "loader"], cwd=ROOT, check=True, capture_output=True, text=True, env=env)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        stop(service)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path,
                        help="a curated folder (default: the demo, curated at the paper profile)")
    parser.add_argument("--size", default="576x320", help="the size whose decode rate is measured")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per rate measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--s3", action="store_true",
                        help="also measure the loader on the folder uploaded to the stack's S3 server (moto, local)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-dataloader-") as scratch:
        results: dict[str, object] = {"size": args.size}
        folder = args.folder
        if folder is None:
            folder, exact = Path(scratch) / "default", Path(scratch) / "lossless"
            started = time.perf_counter()
            curate_demo(folder, lossless=False)
            results["curate_s"] = time.perf_counter() - started
            curate_demo(exact, lossless=True)
            results["storage"] = storage(folder)
            results["storage_lossless"] = storage(exact)
            results["psnr_db"] = fidelity(folder, exact)
        for kind in ("bare", "loader"):
            results[kind] = rate(folder, args.size, args.seconds, kind)
        results["loader_vs_bare"] = results["loader"]["clips_per_s"] / results["bare"]["clips_per_s"]
        if args.s3:
            results["loader_s3"] = rate_from_s3(folder, Path(scratch), args.size, args.seconds)
    print(json.dumps(results, indent=2))
    if "storage" in results:
        s, exact = results["storage"], results["storage_lossless"]
        smaller = s["raw_mb_per_clip"] / s["stored_mb_per_clip"]
        print(f"\nstored: {s['stored_mb_per_clip']:.2f} MB per clip ({smaller:.0f}x smaller than "
              f"{s['raw_mb_per_clip']:.1f} MB of raw frames; lossless {exact['stored_mb_per_clip']:.2f} MB)")
        psnr = ", ".join(f"{k} {v:.2f} dB" for k, v in results["psnr_db"].items())
        print(f"PSNR against the curated frames: {psnr}")
    print(f"{args.size} on one core: loader {results['loader']['clips_per_s']:.1f} clips/s, bare decode "
          f"{results['bare']['clips_per_s']:.1f} clips/s ({results['loader_vs_bare']:.2f}x)")
    if "loader_s3" in results:
        print(f"{args.size} on one core from S3 through the data cache: {results['loader_s3']['clips_per_s']:.1f} "
              f"clips/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
