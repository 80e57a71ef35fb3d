"""Trainer speed against a bare torch loop on the same model, batch and optimizer; memory with and without
gradient checkpointing.

    python benchmarks/bench_train.py [--stage base] [--steps 20] [--params params.yaml] [--data DIR]
    python benchmarks/bench_train.py --processes 1 2 [--stage base] ...   # data-parallel samples/s, N=1 vs 2
    python benchmarks/bench_train.py --processes 1 2 --fsdp --checkpointing --params paper.yaml  # on GPUs:
        # each N with and without FSDP and gradient checkpointing: samples/s and peak GB per GPU
    python benchmarks/bench_train.py --lora [--stage base] [--params params.yaml]  # full fine-tuning vs LoRA
        # (train.lora, else rank 4 on the attention projections): trainable parameters, optimizer-state, gradient
        # and EMA bytes, s/step, and on CUDA the peak GB, each in the same process on the same batch

The trainer's seconds per step come from its own metrics.jsonl (median, warm-up steps dropped); the bare
loop is forward + MSE + backward + clip + AdamW step on a fixed batch of the same shape. Ratio = bare step /
trainer step (goal >= 0.9). Peak memory is measured in a fresh process per setting (CUDA: max allocated;
CPU: peak RSS, which the process's baseline dominates), and the activations autograd keeps for one training
forward are counted exactly with saved-tensor hooks (what gradient checkpointing reduces). Without --data
the demo manifest is curated into a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def fixed_batch(stage: str, params: Any, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """(input, target, text, timesteps, class labels or None): one random batch shaped like the trainer's."""
    frames, channels = {"base": (8, 3), "interp": (5, 7), "sr1": (8, 6)}[stage]
    sizes = sorted((s.height, s.width) for s in params.curate.clip.sizes)
    h, w = sizes[-1] if stage == "sr1" else sizes[0]
    b = params.train.batch_size
    return (torch.randn(b, channels, frames, h, w, device=device), torch.randn(b, 3, frames, h, w, device=device),
            torch.randn(b, 77, 384, device=device), torch.randint(1000, (b,), device=device),
            torch.randint(250, (b,), device=device) if stage == "sr1" else None)


def timed_steps(unet: torch.nn.Module, trained: list[torch.nn.Parameter], optimizer: Any,
                batch: tuple[torch.Tensor, ...], steps: int, grad_clip: float) -> list[float]:
    """Seconds of each of `steps` plain training steps (forward, MSE, backward, clip, AdamW) on `batch`."""
    import torch.nn.functional as F

    x, target, text, t, labels = batch
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = F.mse_loss(unet(x, t, text, class_labels=labels).sample[:, :3], target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def bare_loop(stage: str, params_path: Path, steps: int, checkpointing: bool) -> float:
    """Median seconds per step of a plain training loop on a fixed batch shaped like the trainer's."""
    from show1.config import load_params
    from show1.models.configs import pixel_unet_config
    from show1.models.unet_3d_condition import ShowOneUNet3DConditionModel

    params = load_params(params_path)
    cfg = params.train
    torch.manual_seed(0)
    unet = ShowOneUNet3DConditionModel.from_config(pixel_unet_config(stage, params.profile, 384)).train()
    unet.set_gradient_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate)
    times = timed_steps(unet, list(unet.parameters()), optimizer, fixed_batch(stage, params), steps, cfg.grad_clip)
    return statistics.median(times[2:])


def lora_vs_full(stage: str, params_path: Path, steps: int) -> dict[str, Any]:
    """Full fine-tuning and LoRA (train.lora, else its defaults) of the stage's UNet on one fixed batch, one after
    the other in this process: what the trainer's optimizer steps and keeps (trainable parameters, AdamW's state,
    gradients, the EMA copy), the median s/step, and on CUDA the peak allocated GB of each."""
    from show1.config import Lora, load_params
    from show1.models.configs import pixel_unet_config
    from show1.models.unet_3d_condition import ShowOneUNet3DConditionModel
    from show1.training import lora

    params = load_params(params_path)
    cfg = params.train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = fixed_batch(stage, params, device)
    settings = cfg.lora or Lora()
    result: dict[str, Any] = {"stage": stage, "profile": params.profile, "device": device,
                              "lora_settings": settings.model_dump(mode="json")}
    for name, chosen in (("full", None), ("lora", settings)):
        torch.manual_seed(0)
        unet = ShowOneUNet3DConditionModel.from_config(pixel_unet_config(stage, params.profile, 384)).train()
        if chosen is not None:
            lora.add_adapter(unet, chosen)
        unet.to(device)
        trained = lora.trained_parameters(unet, chosen)
        optimizer = torch.optim.AdamW(trained, lr=cfg.learning_rate)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = timed_steps(unet, trained, optimizer, batch, steps, cfg.grad_clip)
        state = [value for entry in optimizer.state.values() for value in entry.values()
                 if isinstance(value, torch.Tensor)]
        trained_bytes = sum(p.numel() * p.element_size() for p in trained)
        row = {"parameters": sum(p.numel() for p in unet.parameters()),
               "trainable_parameters": sum(p.numel() for p in trained),
               "optimizer_state_bytes": sum(v.numel() * v.element_size() for v in state),
               "gradient_bytes": trained_bytes, "ema_bytes": trained_bytes,
               "s_per_step": round(statistics.median(times[1:]), 4)}
        if device == "cuda":
            row["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result[name] = row
        del unet, optimizer, trained, state
    full, adapted = result["full"], result["lora"]
    result["lora_vs_full"] = {key: round(adapted[key] / full[key], 5) for key in
                              ("trainable_parameters", "optimizer_state_bytes", "s_per_step", "gpu_peak_gb")
                              if key in full}
    return result


def trainer_step(stage: str, params_path: Path, data: Path, steps: int) -> float:
    from show1.config import load_params
    from show1.training.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        train(stage, data, Path(tmp) / "run", load_params(params_path), max_steps=steps, checkpoint_every=10**6,
              track=False)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    # samples_per_s covers the whole step (data, text, forward, backward, optimizer, EMA); drop warm-up steps.
    params = load_params(params_path).train
    return statistics.median(params.batch_size / r["samples_per_s"] for r in rows[2:])  # batch_size: global


def data_parallel_run(stage: str, params_path: Path, data: Path, steps: int, processes: int, fsdp: bool = False,
                      checkpointing: bool = False) -> dict[str, float]:
    """`show1 train` in `processes` torchrun processes on this machine (gloo on CPUs, NCCL on GPUs), the UNet
    sharded with FSDP or not, gradient checkpointing on or off: median samples/s (global batch per step time,
    warm-up steps dropped) and, on GPUs, the main process's peak allocated GB."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        run, variant = Path(tmp) / "run", Path(tmp) / "params.yaml"
        params = yaml.safe_load(params_path.read_text()) or {}
        params["train"] = (params.get("train") or {}) | {"fsdp": fsdp, "gradient_checkpointing": checkpointing}
        variant.write_text(yaml.safe_dump(params, sort_keys=False))
        from flows.train import launcher  # the command the Prefect train flow starts its processes with

        subprocess.run([*launcher(processes, None), "-m", "show1.cli", "--params", str(variant), "train",
                        "--stage", stage, "--data", str(data), "--out", str(run), "--max-steps", str(steps),
                        "--checkpoint-every", str(10**6), "--no-track", "--quiet"], check=True, cwd=ROOT,
                       capture_output=True)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result = {"samples_per_s": round(statistics.median(r["samples_per_s"] for r in rows[2:]), 3)}
    if "gpu_peak_gb" in rows[-1]:
        result["gpu_peak_gb"] = round(rows[-1]["gpu_peak_gb"], 2)
    return result


def peak_memory_mb(stage: str, params_path: Path, checkpointing: bool) -> float:
    code = (f"import resource, torch, sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from benchmarks.bench_train import bare_loop; "
            f"bare_loop({stage!r}, __import__('pathlib').Path({str(params_path)!r}), 3, {checkpointing}); "
            "print(torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def activation_memory_mb(stage: str, params_path: Path, checkpointing: bool) -> float:
    """MB of tensors autograd keeps for the backward pass of one training forward (what checkpointing saves)."""
    from show1.config import load_params
    from show1.models.configs import pixel_unet_config
    from show1.models.unet_3d_condition import ShowOneUNet3DConditionModel

    params = load_params(params_path)
    unet = ShowOneUNet3DConditionModel.from_config(pixel_unet_config(stage, params.profile, 384)).train()
    unet.set_gradient_checkpointing(checkpointing)
    frames, channels = {"base": (8, 3), "interp": (5, 7), "sr1": (8, 6)}[stage]
    sizes = sorted((s.height, s.width) for s in params.curate.clip.sizes)
    h, w = sizes[-1] if stage == "sr1" else sizes[0]
    b = params.train.batch_size
    labels = torch.randint(250, (b,)) if stage == "sr1" else None
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(torch.randn(b, channels, frames, h, w), torch.randint(1000, (b,)), torch.randn(b, 77, 384),
             class_labels=labels).sample.sum()
    return round(total[0] / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["base", "interp", "sr1"], default="base")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--processes", type=int, nargs="+", metavar="N",
                        help="Instead: samples/s of `show1 train` under torchrun with each N (e.g. 1 2), in this run "
                             "on this machine, and each N's ratio to the first.")
    parser.add_argument("--fsdp", action="store_true",
                        help="With --processes: each N also with the UNet sharded (train.fsdp).")
    parser.add_argument("--checkpointing", action="store_true",
                        help="With --processes: each setting also with gradient checkpointing.")
    parser.add_argument("--lora", action="store_true",
                        help="Instead: full fine-tuning vs LoRA (train.lora, else rank 4): trainable parameters, "
                             "optimizer-state bytes, s/step and, on CUDA, peak GB.")
    args = parser.parse_args()
    if args.lora:
        print(json.dumps(lora_vs_full(args.stage, args.params, max(args.steps, 3)), indent=2))
        return
    from show1.config import apply_environment_defaults, load_params
    from show1.data.curate import curate

    apply_environment_defaults()
    data = args.data
    if data is None:
        data = Path(tempfile.mkdtemp()) / "curated"
        curate(ROOT / "data/manifests/demo.csv", data, load_params(args.params))
    if args.processes:
        settings = [(fsdp, checkpointing) for fsdp in (False, True)[:1 + args.fsdp]
                    for checkpointing in (False, True)[:1 + args.checkpointing]]
        runs = {}
        for n in args.processes:
            for fsdp, checkpointing in settings:
                name = f"{n} processes" + (", fsdp" if fsdp else "") + (", checkpointing" if checkpointing else "")
                runs[name] = data_parallel_run(args.stage, args.params, data, args.steps, n, fsdp, checkpointing)
                print(name, runs[name], file=sys.stderr)
        baseline = next(iter(runs.values()))["samples_per_s"]
        print(json.dumps({"stage": args.stage, "runs": runs, "samples_per_s_ratio_to_first": {
            name: round(run["samples_per_s"] / baseline, 3) for name, run in runs.items()}}, indent=2))
        return
    trainer = trainer_step(args.stage, args.params, data, args.steps)
    bare = bare_loop(args.stage, args.params, args.steps, checkpointing=False)
    result = {
        "stage": args.stage, "trainer_s_per_step": round(trainer, 4), "bare_s_per_step": round(bare, 4),
        "ratio": round(bare / trainer, 3),
        "peak_memory_mb": {"checkpointing_off": peak_memory_mb(args.stage, args.params, False),
                           "checkpointing_on": peak_memory_mb(args.stage, args.params, True)},
        "saved_activations_mb": {"checkpointing_off": activation_memory_mb(args.stage, args.params, False),
                                 "checkpointing_on": activation_memory_mb(args.stage, args.params, True)},
    }
    print(json.dumps(result, indent=2))
    print(f"trainer runs at {result['ratio']:.2f}x the bare loop's speed (goal >= 0.9)")


if __name__ == "__main__":
    main()
