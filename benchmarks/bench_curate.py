"""Curation throughput against a bare PyAV decode of the same files, measured side by side.

    python benchmarks/bench_curate.py [--manifest M] [--params params.yaml] [--repeats 3] [--workers 1]
    python benchmarks/bench_curate.py --executor dask --workers 2 [--copies 8] [--rows-per-chunk 1]

Local (default): clips/s and source-seconds/s for `show1.data.curate.curate` (probe, filters, resample to the
clip fps, resize+crop to every size, hashes, shards, index) and for a plain `for frame in decode(): pass` over
the same files (those curation decodes: not the rows it rejects before decoding), then the ratio (goal: >= 0.8).
Medians over `--repeats` runs, after one untimed run of each (the page cache, codec start-up, curation's lazy
imports and JIT-compiled kernels: costs a process pays once, not per source); each curation starts from an empty
output folder.

`--executor dask`: the same curation on a LocalCluster of 1 worker process and of `--workers` processes, in one
run (each cluster started before its timing): sources/hour per worker and the speed-up of N workers over 1.
`--copies K` lists every manifest row K times (distinct ids, the same files: every copy is decoded; the
copies are then rejected as duplicates), so that there are enough chunks to share out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import av

from show1.config import Executor, Params, apply_environment_defaults, load_params
from show1.data.curate import curate, plan_curation
from show1.data.errors import Rejected
from show1.data.executors import chunk_runner
from show1.data.manifest import read_manifest
from show1.data.sources import resolve_local

# Rows quarantined for these reasons were decoded (in part or whole) before they were rejected.
DECODED_REASONS = {"undecodable", "too_short", "static", "duplicate"}


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
    parser.add_argument("--workers", type=int, default=1, help="local: threads; dask: worker processes")
    parser.add_argument("--executor", choices=["local", "dask"], default="local")
    parser.add_argument("--copies", type=int, default=1, help="dask: list each manifest row this many times")
    parser.add_argument("--rows-per-chunk", type=int, default=1, help="dask: curate.rows_per_shard")
    args = parser.parse_args()

    params = load_params(args.params, args.profile)
    if args.executor == "dask":
        return compare_workers(args, params)
    plan = plan_curation(args.manifest, Path(tempfile.mkdtemp()), params)
    paths, decodable = [], []
    for row in plan.rows:
        try:
            paths.append(resolve_local(row.video or "", args.manifest.parent, params.curate.allowed_roots,
                                       params.curate.allowed_packages))
            decodable.append(row)
        except Rejected:
            continue  # URLs and bad rows: curated, but not part of the decode baseline
    curate_times, decode_times, rgb_times, summary = [], [], [], None
    bare_decode(paths, to_rgb=False)  # warm the page cache and codec initialisation for both sides
    with tempfile.TemporaryDirectory() as tmp:  # and curation's once-per-process costs (lazy imports, JIT kernels)
        curate(args.manifest, Path(tmp) / "out", params, workers=args.workers)
        # The baseline decodes what curation decodes: not the files it rejects before decoding (the paper profile's
        # size limits reject the demo's 176x144 clips from their header).
        unread = {q["row"] for q in map(json.loads, (Path(tmp) / "out" / "quarantine.jsonl").open())
                  if q["reason"] not in DECODED_REASONS}
        paths = [p for p, row in zip(paths, decodable, strict=True) if row.row not in unread]
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = curate(args.manifest, Path(tmp) / "out", params, workers=args.workers)
            curate_times.append(time.perf_counter() - start)
        decode_times.append(bare_decode(paths, to_rgb=False))
        rgb_times.append(bare_decode(paths, to_rgb=True))
    assert summary is not None
    seconds_of_video = 0.0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            seconds_of_video += float(stream.duration * stream.time_base)
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


def copied_manifest(manifest: Path, copies: int, folder: Path, params: Params) -> Path:
    """The manifest's rows `copies` times, with distinct ids (paths made absolute, so it can live elsewhere)."""
    import csv

    rows = read_manifest(manifest, params.curate.columns)
    path = folder / "copies.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video", "caption"])
        for copy in range(copies):
            for row in rows:
                video = row.video or ""
                local = manifest.parent / video
                writer.writerow([f"c{copy}-r{row.row}", str(local.resolve()) if local.exists() else video,
                                 row.caption])
    return path


def compare_workers(args: argparse.Namespace, params: Params) -> None:
    params = params.model_copy(update={"curate": params.curate.model_copy(
        update={"rows_per_shard": args.rows_per_chunk, "allowed_roots": [Path("/")]})})
    with tempfile.TemporaryDirectory() as tmp:
        manifest = copied_manifest(args.manifest, args.copies, Path(tmp), params)
        sources = len(plan_curation(manifest, Path(tmp) / "out", params).rows)
        seconds = {}
        for workers in sorted({1, args.workers}):
            with chunk_runner(Executor(kind="dask", workers=workers)) as run:
                times = []
                for repeat in range(args.repeats):
                    start = time.perf_counter()
                    curate(manifest, Path(tmp) / f"out-{workers}-{repeat}", params, run_chunks=run)
                    times.append(time.perf_counter() - start)
            seconds[workers] = statistics.median(times)
    result = {
        "sources": sources, "chunks": -(-sources // args.rows_per_chunk),
        **{f"seconds_{w}_workers": round(t, 3) for w, t in seconds.items()},
        **{f"sources_per_hour_per_worker_{w}": round(sources / t * 3600 / w) for w, t in seconds.items()},
        "speedup": round(seconds[1] / seconds[args.workers], 3),
    }
    print(json.dumps(result, indent=2))
    print(f"{args.workers} Dask workers curate {result['speedup']:.2f}x as fast as 1 worker")


if __name__ == "__main__":
    main()
