"""Curation throughput against a bare PyAV decode of the same files, measured side by side.

    python benchmarks/bench_curate.py [--manifest M] [--params params.yaml] [--repeats 3] [--workers 1]

Prints clips/s and source-seconds/s for `show1.data.curate.curate` (probe, filters, resample to the clip
fps, resize+crop to every size, hashes, shards, index) and for a plain `for frame in decode(): pass` over
the same files, then the ratio (goal: >= 0.8). Medians over `--repeats` runs; each curation starts from an
empty output folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import av

from show1.config import apply_environment_defaults, load_params
from show1.data.curate import curate, plan_curation
from show1.data.errors import Rejected
from show1.data.sources import resolve_local


def bare_decode(paths: list[Path], to_rgb: bool) -> float:
    """Seconds to decode every frame of every file (optionally converting each to RGB)."""
    start = time.perf_counter()
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if to_rgb:
                    frame.to_ndarray(format="rgb24")
    return time.perf_counter() - start


def main() -> None:
    apply_environment_defaults()
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=root / "data/manifests/demo.csv")
    parser.add_argument("--params", type=Path, default=root / "params.yaml")
    parser.add_argument("--profile", choices=["tiny", "paper"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    params = load_params(args.params, args.profile)
    plan = plan_curation(args.manifest, Path(tempfile.mkdtemp()), params)
    paths = []
    for row in plan.rows:
        try:
            paths.append(resolve_local(row.video or "", args.manifest.parent, params.curate.allowed_roots,
                                       params.curate.allowed_packages))
        except Rejected:
            continue  # URLs and bad rows: curated, but not part of the decode baseline
    seconds_of_video = 0.0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            seconds_of_video += float(stream.duration * stream.time_base)

    curate_times, decode_times, rgb_times, summary = [], [], [], None
    bare_decode(paths, to_rgb=False)  # warm the page cache and codec initialisation for both sides
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = curate(args.manifest, Path(tmp) / "out", params, workers=args.workers)
            curate_times.append(time.perf_counter() - start)
        decode_times.append(bare_decode(paths, to_rgb=False))
        rgb_times.append(bare_decode(paths, to_rgb=True))
    assert summary is not None
    t_curate, t_decode, t_rgb = (statistics.median(t) for t in (curate_times, decode_times, rgb_times))
    result = {
        "files": len(paths), "source_seconds": round(seconds_of_video, 2), "clips": summary.clips,
        "curate_s": round(t_curate, 4), "decode_s": round(t_decode, 4), "decode_rgb_s": round(t_rgb, 4),
        "curate_clips_per_s": round(summary.clips / t_curate, 2),
        "curate_source_seconds_per_s": round(seconds_of_video / t_curate, 2),
        "decode_source_seconds_per_s": round(seconds_of_video / t_decode, 2),
        "ratio_vs_decode": round(t_decode / t_curate, 3),
        "ratio_vs_decode_rgb": round(t_rgb / t_curate, 3),
    }
    print(json.dumps(result, indent=2))
    print(f"curation runs at {result['ratio_vs_decode']:.2f}x the bare decode rate (goal >= 0.8)")


if __name__ == "__main__":
    main()
