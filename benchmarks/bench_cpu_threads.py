"""torch's CPU threads on a busy machine: OpenMP's spin-waiting (ACTIVE) against sleeping (PASSIVE, show1's default).

    python benchmarks/bench_cpu_threads.py [--busy-per-core 2] [--repeats 2] [--steps 2]

Each measurement is a fresh process (OpenMP reads OMP_WAIT_POLICY once, when torch loads) that builds random tiny
base + interp weights and times two generations of the tiny cascade (base + interpolation, `--steps` steps), on
torch's default thread count. Both policies run alternately, first on the idle machine, then with
`--busy-per-core` busy-loop processes per core (stopped afterwards, whatever happens). Prints the median wall
and CPU seconds of each, and the ratios ACTIVE / PASSIVE (above 1: PASSIVE is faster, or uses less CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/load.py: the busy loops the load tests use

MEASURE = """
import json, os, sys, tempfile, time
import torch
from show1.pipelines.cascade import Show1Pipeline
from show1.pipelines.weights import init_weights
with tempfile.TemporaryDirectory() as folder:
    init_weights(folder, "tiny", stages=("base", "interp"))
    pipe = Show1Pipeline.from_pretrained(folder, stages=("base", "interp"))
    pipe.set_progress_bar_config(disable=True)
    before, start = os.times(), time.perf_counter()
    for seed in (3, 4):
        pipe("a red kite over a beach", seed=seed, num_inference_steps=int(sys.argv[1]))
    after = os.times()
print(json.dumps({"wall": time.perf_counter() - start, "cpu": after.user + after.system - before.user - before.system,
                  "threads": torch.get_num_threads()}))
"""


def measure(policy: str, steps: int) -> dict[str, float]:
    env = dict(os.environ, OMP_WAIT_POLICY=policy, HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-c", MEASURE, str(steps)], env=env, capture_output=True, text=True,
                          check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(label: str, repeats: int, steps: int) -> dict[str, float]:
    runs: dict[str, list[dict[str, float]]] = {"ACTIVE": [], "PASSIVE": []}
    for _ in range(repeats):
        for policy in runs:
            runs[policy].append(measure(policy, steps))
            print(f"{label} {policy}: {runs[policy][-1]}", file=sys.stderr, flush=True)
    result: dict[str, float] = {}
    for policy, rows in runs.items():
        for key in ("wall", "cpu"):
            result[f"{policy.lower()}_{key}_s"] = round(statistics.median(r[key] for r in rows), 2)
    result["wall_ratio_active_over_passive"] = round(result["active_wall_s"] / result["passive_wall_s"], 2)
    result["cpu_ratio_active_over_passive"] = round(result["active_cpu_s"] / result["passive_cpu_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy-per-core", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    from load import busy_cores

    results = {"cores": os.cpu_count(), "idle": compare("idle", args.repeats, args.steps)}
    with busy_cores(per_core=args.busy_per_core) as busy:  # the loops are stopped whatever happens
        results[f"busy ({busy} busy-loop processes)"] = compare("busy", args.repeats, args.steps)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
