"""Per-stage inference speed and memory, side by side with baselines measured in the same run.

    python benchmarks/bench_inference.py [--profile tiny|paper] [--device cpu|cuda] [--dtype float32|bfloat16]
                                         [--weights-dir DIR] [--cascade] [--batch-size B]

For every stage: seconds per denoising step of our pipeline (from runs of two step counts, so prompt
encoding, VAE and other fixed costs cancel) against a bare loop of UNet forwards on the same inputs
(overhead = pipeline step / bare step; goal <= 1.05), and peak memory (CUDA: max allocated; CPU: growth
of the process's peak RSS). sr2 is also timed against diffusers' VideoToVideoSDPipeline on the same
weights (speed ratio = theirs / ours; goal >= 1.0). `--cascade` runs the whole cascade once with model
CPU offload (CUDA) and reports the peak GPU memory and the time per stage. Without --weights-dir, random
weights of --profile are built on --device in --dtype, text encoders included (paper: T5-XXL- and
OpenCLIP-H-shaped, tokenizers trained here; no download): `--profile paper --device cuda` needs nothing else.
`--batch-size B` also measures videos/hour with B prompts batched through the cascade (`show1 generate --prompts
FILE --batch-size B`) against the same B prompts one at a time, in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from show1.config import apply_environment_defaults


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def per_step(run: Callable[[int], Any], steps: tuple[int, int], device: str) -> float:
    """Seconds per step from two step counts (fixed costs cancel); the median of three pairs."""
    run(steps[0])  # warm-up
    pairs = sorted((timed(lambda: run(steps[1]), device) - timed(lambda: run(steps[0]), device))
                   / (steps[1] - steps[0]) for _ in range(3))
    return pairs[1]


def bare_unet_step(unet: torch.nn.Module, inputs: dict[str, Any], device: str, repeats: int = 3) -> float:
    with torch.no_grad():
        unet(**inputs)
        return sorted(timed(lambda: unet(**inputs), device) for _ in range(repeats))[repeats // 2]


def main() -> None:
    apply_environment_defaults()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--cascade", action="store_true")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="also measure videos/hour with B prompts batched through the cascade vs one at a time")
    parser.add_argument("--throughput-stages", default="base,interp,sr1,sr2",
                        help="the cascade prefix of the --batch-size measurement (CPU: base,interp)")
    parser.add_argument("--throughput-steps", type=int, default=None,
                        help="denoising steps per stage in the --batch-size measurement (default: published)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device

    from show1.models.random_text import random_text_encoder
    from show1.models.text import load_text_encoder, tiny_text_encoder_dir
    from show1.pipelines.cascade import Show1Pipeline
    from show1.pipelines.weights import build_stage

    if args.weights_dir:
        cascade = Show1Pipeline.from_pretrained(args.weights_dir, torch_dtype=dtype)
        stages = cascade.stages
    else:  # random weights built on the device in the benchmark's dtype (paper: random T5-XXL and OpenCLIP-H too)
        texts = {"base": random_text_encoder("t5", dtype, device), "sr2": random_text_encoder("clip", dtype, device)} \
            if args.profile == "paper" else {"base": load_text_encoder(tiny_text_encoder_dir())}
        dim = texts["base"][1].config.hidden_size
        stages = {s: build_stage(s, args.profile, dim, texts.get(s), device=device, dtype=dtype) for s in
                  ("base", "interp", "sr1", "sr2")}
        cascade = Show1Pipeline(stages)
    for pipe in stages.values():
        pipe.to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
    base = stages["base"]
    embeddings = base.encode_prompts("a red kite over a beach")
    text = embeddings.for_guidance(True)
    g = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    paper = args.profile == "paper"
    h, w = 40, 64
    sr_h, sr_w = 160, 256
    results: dict[str, Any] = {"profile": args.profile, "device": device, "dtype": args.dtype}

    def stage_result(name: str, run: Callable[[int], Any], unet: torch.nn.Module, inputs: dict[str, Any],
                     steps: tuple[int, int]) -> None:
        before = peak_memory_mb(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        pipe_step = per_step(run, steps, device)
        bare = bare_unet_step(unet, inputs, device)
        results[name] = {"pipeline_s_per_step": round(pipe_step, 4), "bare_unet_s_per_step": round(bare, 4),
                         "overhead": round(pipe_step / bare, 3),
                         "peak_memory_mb": round(peak_memory_mb(device) - (0 if device == "cuda" else before), 1)}
        print(name, json.dumps(results[name]), flush=True)

    x = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    steps = (2, 4) if not paper else (5, 10)
    stage_result("base", lambda n: base(prompt_embeds=embeddings, num_inference_steps=n, generator=g()),
                 base.unet, {"sample": x(2, 3, 8, h, w), "timestep": 500, "encoder_hidden_states": text}, steps)
    interp = stages["interp"]
    keyframes = x(1, 3, 2, h, w)  # one segment: the unit the interpolation stage repeats 7 times
    stage_result("interp", lambda n: interp(keyframes, prompt_embeds=embeddings, num_inference_steps=n,
                                            generator=g()),
                 interp.unet, {"sample": x(2, 7, 5, h, w), "timestep": 500, "encoder_hidden_states": text}, steps)
    sr1 = stages["sr1"]
    window = x(1, 3, 8, h, w)  # one window: the unit sr1 repeats 4 times for 29 frames
    stage_result("sr1", lambda n: sr1(window, prompt_embeds=embeddings, height=sr_h, width=sr_w,
                                      num_inference_steps=n, generator=g()),
                 sr1.unet, {"sample": x(2, 6, 8, sr_h, sr_w), "timestep": 500, "encoder_hidden_states": text,
                            "class_labels": torch.tensor([250, 250], device=device)}, steps)

    sr2 = stages["sr2"]
    frames = 8
    sr2_embeddings = sr2.encode_prompts("a red kite", "low resolution, blur") if sr2.text_encoder is not None \
        else base.encode_prompts("a red kite", "low resolution, blur")
    low = x(1, 3, frames, sr_h, sr_w).clamp(-1, 1)
    latent_shape = (2, 4, frames, 320 // sr2.vae_scale_factor, 576 // sr2.vae_scale_factor)
    sr2_steps = (5, 10) if not paper else (10, 20)  # strength 0.8: 4 and 8 denoising steps
    stage_result("sr2", lambda n: sr2(low, prompt_embeds=sr2_embeddings, num_inference_steps=n, generator=g()),
                 sr2.unet, {"sample": x(*latent_shape), "timestep": 500,
                            "encoder_hidden_states": sr2_embeddings.for_guidance(True)}, sr2_steps)
    results["sr2"]["pipeline_s_per_step"] = round(results["sr2"]["pipeline_s_per_step"] / 0.8, 4)
    sr2_result = results["sr2"]
    sr2_result["overhead"] = round(sr2_result["pipeline_s_per_step"] / sr2_result["bare_unet_s_per_step"], 3)
    results["sr2"].update(compare_with_diffusers(sr2, low, sr2_embeddings, device, sr2_steps))
    print("sr2 vs diffusers", json.dumps({k: results["sr2"][k] for k in ("diffusers_s", "ours_s", "speed_ratio")}))

    if args.cascade:
        if device == "cuda":
            cascade.enable_model_cpu_offload(device)
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = cascade("a red kite over a beach", generator=g())
        results["cascade"] = {"frames": list(out.frames.shape), "seconds": round(time.perf_counter() - start, 1),
                              "peak_memory_mb": round(peak_memory_mb(device), 1)}
        print("cascade", json.dumps(results["cascade"]))
    if args.batch_size:
        from show1.config import Sampling
        from show1.pipelines.cascade import check_stages

        chosen = check_stages(args.throughput_stages.split(","))
        results["throughput"] = throughput(Show1Pipeline({s: stages[s] for s in chosen}), args.batch_size,
                                           args.throughput_steps, device, Sampling())
        print("throughput", json.dumps(results["throughput"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def throughput(cascade: Any, batch_size: int, steps: int, device: str, sampling: Any) -> dict[str, Any]:
    """Videos per hour when B prompts go through the cascade together vs one at a time, measured in the same run
    (same prompts, seeds and steps; one untimed warm-up each), and the largest difference between the two videos
    of each prompt (float rounding of batched arithmetic)."""
    prompts = [f"a red kite over a beach, take {i}" for i in range(batch_size)]
    run_batch = lambda: cascade(prompts, seed=0, num_inference_steps=steps, sampling=sampling)  # noqa: E731
    run_each = lambda: [cascade(p, seed=i, num_inference_steps=steps, sampling=sampling)  # noqa: E731
                        for i, p in enumerate(prompts)]
    run_batch(), run_each()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batched_s = timed(run_batch, device)
    batched_peak = peak_memory_mb(device)
    each_s = timed(run_each, device)
    together, alone = run_batch().frames, [out.frames[0] for out in run_each()]
    difference = max(float((together[i].float() - alone[i].float()).abs().max()) for i in range(batch_size))
    return {"batch_size": batch_size, "steps": steps, "stages": list(cascade.stage_names),
            "batched_s_per_video": round(batched_s / batch_size, 3), "one_at_a_time_s_per_video":
            round(each_s / batch_size, 3), "batched_videos_per_hour": round(3600 * batch_size / batched_s, 1),
            "one_at_a_time_videos_per_hour": round(3600 * batch_size / each_s, 1),
            "speed_ratio": round(each_s / batched_s, 3), "max_frame_difference": difference,
            "batched_peak_memory_mb": round(batched_peak, 1)}


def compare_with_diffusers(ours: Any, video: torch.Tensor, embeddings: Any, device: str,
                           steps: tuple[int, int]) -> dict[str, float]:
    """Whole-call time of ours and of diffusers' VideoToVideoSDPipeline on the same weights and embeddings."""
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_synth_img2img import (
        VideoToVideoSDPipeline,
    )

    theirs = VideoToVideoSDPipeline(vae=ours.vae, text_encoder=None, tokenizer=None, unet=ours.unet,
                                    scheduler=ours.scheduler)
    theirs.set_progress_bar_config(disable=True)
    n = steps[1]
    # Both get frames already at the output size, so neither pays for resizing.
    frames = video.clamp(-1, 1)[0].permute(1, 0, 2, 3)  # (F, 3, h, w)
    resized_5d = torch.nn.functional.interpolate(frames, (320, 576), mode="bilinear").permute(1, 0, 2, 3)[None]
    run_ours = lambda: ours(resized_5d, prompt_embeds=embeddings, num_inference_steps=n,  # noqa: E731
                            generator=torch.Generator("cpu").manual_seed(0))
    video_01 = resized_5d.permute(0, 2, 1, 3, 4) * 0.5 + 0.5  # theirs: (B, F, 3, H, W) in [0, 1]
    run_theirs = lambda: theirs(video=video_01, prompt_embeds=embeddings.positive,  # noqa: E731
                                negative_prompt_embeds=embeddings.negative, num_inference_steps=n, strength=0.8,
                                guidance_scale=15.0, generator=torch.Generator("cpu").manual_seed(0),
                                output_type="pt")
    run_ours(), run_theirs()
    ours_s = sorted(timed(run_ours, device) for _ in range(3))[1]
    theirs_s = sorted(timed(run_theirs, device) for _ in range(3))[1]
    return {"ours_s": round(ours_s, 3), "diffusers_s": round(theirs_s, 3), "speed_ratio": round(theirs_s / ours_s, 3)}


if __name__ == "__main__":
    main()
