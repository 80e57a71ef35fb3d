"""The one trainer, on 🤗 accelerate: read it top to bottom in `train` (set-up, resume, loop, stage folder).

Every stage: base, interp and sr1 (pixel UNets) and sr2 (latent, frozen VAE, timesteps 0–900), each described by
one spec (show1.training.specs.SPECS). ε-prediction with IF's hybrid loss for the pixel UNets' learned variance (or
ε-only: `train.loss`), caption dropout for classifier-free guidance, AdamW with warmup, gradient accumulation and
clipping, mixed precision and gradient checkpointing through accelerate/config, EMA weights, atomic checkpoints
(every N steps, last K kept) and exact resume: model, optimizer, LR schedule, EMA, RNG state and data position are
restored, and every random draw of a clip comes from a generator keyed by (seed, step, micro-step, its slot in the
global batch), so on the CPU a resumed run's losses equal an uninterrupted run's bit for bit. Under torchrun or
`accelerate launch` the processes share each global batch (show1.training.ranks); only the main one writes. With
FSDP (show1.training.sharding) the UNet, its gradients, EMA and optimizer state are sharded over the processes, and
checkpoints are gathered into the same files. With `train.lora` only peft adapters on the frozen --init-from UNet are
trained (show1.training.lora): optimizer, EMA, checkpoints and final/ hold the adapter, not the UNet.

RUN_DIR/metrics.jsonl      one row per optimizer step: step, loss (mean over the global batch), lr, samples_per_s
                           (and gpu_peak_gb on CUDA: the main process's peak allocated memory so far)
RUN_DIR/checkpoints/step-N/ a stage folder (model_index.json, unet/, scheduler/ …) + ema.safetensors,
                           training_state.safetensors/.json (optimizer, LR, RNG), state.json,
                           checksums.json (sha256 of every file: a changed file refuses to load)
RUN_DIR/final/             a stage folder (EMA weights) that the stage's pipeline loads (LoRA: adapter/ and base.json)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet3DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from show1 import atomic, integrity, tensor_tree
from show1.config import Params, Train
from show1.data.clip_index import INDEX_PARQUET, curated_sizes
from show1.data.curated_files import CuratedFiles
from show1.data.dataset import CuratedClips
from show1.data.video import write_video
from show1.faults import fault_point
from show1.integrity import IntegrityError
from show1.models.configs import (
    image_noising_scheduler_config,
    pixel_scheduler_config,
    pixel_unet_config,
    scheduler_from_config,
)
from show1.models.text_layout import tiny_text_encoder_dir
from show1.models.unet_3d_condition import ShowOneUNet3DConditionModel
from show1.pipelines.base import PromptEmbeddings
from show1.pipelines.sr2 import (
    ZEROSCOPE_SCHEDULER_CONFIG,
    paper_sr2_unet_config,
    paper_sr2_vae_config,
    tiny_sr2_components,
)
from show1.pipelines.weights import assemble_stage
from show1.registry.init_source import InitSource, resolve_init_source
from show1.training import lora, sharding
from show1.training.captions import CaptionEmbeddings, caption_embeddings
from show1.training.clip_batches import ClipBatches
from show1.training.data_order import DataOrder
from show1.training.losses import diffusion_loss
from show1.training.ranks import Ranks, item_generator, micro_batch
from show1.training.runs import (
    CHECKPOINTS,
    METRICS,
    TRAINABLE_STAGES,
    TrainResult,
    fingerprint,
    latest_checkpoint,
)
from show1.training.samples import sample_video
from show1.training.specs import SPECS, draw_batch, training_size, training_timesteps  # noqa: F401 (re-exported)
from show1.training.tracking import TrainingRun
from show1.weight_files import check_folder

logger = logging.getLogger(__name__)
TRAINING_STATE = "training_state"  # .safetensors + .json (see show1.tensor_tree)


@dataclass
class StageModel:
    """What a stage trains (`unet`) and the frozen parts it needs: sr2's VAE, the training noise schedule."""

    unet: torch.nn.Module
    noise_schedule: Any
    vae: Any = None
    eps_channels: int = 3  # pixel stages predict ε (3) + learned variance (3); sr2 predicts latent ε (4)


def _folder_part(folder: Path, name: str) -> Path:
    return folder / name if (folder / name).is_dir() else folder


def load_model(stage: str, params: Params, text_dim: int, init_from: Path | None, init_2d: Path | None
               ) -> StageModel:
    """The stage's trainable UNet: from a stage folder (fine-tuning), inflated from 2D, or from scratch."""
    if init_from is not None and init_2d is not None:
        raise ValueError("pass --init-from or --init-2d, not both")
    if SPECS[stage].latent:  # sr2: zeroscope's latent UNet and its frozen VAE
        if init_2d is not None:
            raise ValueError("--init-2d inflates pixel UNets; sr2 starts from a latent video model (--init-from)")
        if init_from is not None:
            check_folder(init_from)
            unet = UNet3DConditionModel.from_pretrained(_folder_part(init_from, "unet"), use_safetensors=True)
            vae = AutoencoderKL.from_pretrained(init_from / "vae", use_safetensors=True)
        else:
            parts = tiny_sr2_components(text_dim) if params.profile == "tiny" else {
                "unet": UNet3DConditionModel(**paper_sr2_unet_config()), "vae": AutoencoderKL(**paper_sr2_vae_config())}
            unet, vae = parts["unet"], parts["vae"]
        schedule = DDPMScheduler.from_config({k: v for k, v in ZEROSCOPE_SCHEDULER_CONFIG.items()
                                              if k != "set_alpha_to_one"})
        return StageModel(unet, schedule, vae.requires_grad_(False).eval(), eps_channels=4)
    if init_from is not None:
        check_folder(init_from)
        unet = ShowOneUNet3DConditionModel.from_pretrained(_folder_part(init_from, "unet"), use_safetensors=True)
    elif init_2d is not None:
        check_folder(init_2d)
        unet = ShowOneUNet3DConditionModel.from_2d(_folder_part(init_2d, "unet"))
    else:
        unet = ShowOneUNet3DConditionModel.from_config(pixel_unet_config(stage, params.profile, text_dim))
    return StageModel(unet, scheduler_from_config(pixel_scheduler_config() | {"_class_name": "DDPMScheduler"}))


def _init_source(init_from: Path | str | None, stage: str, params: Params, ranks: Ranks) -> InitSource | None:
    """`--init-from` as a folder on this machine: a registered version (`models:/show1-base@champion`) is resolved
    and downloaded by the main process first, then found in the cache by the others."""
    if init_from is None:
        return None
    if ranks.is_main:
        source = resolve_init_source(init_from, stage, params)
    ranks.wait()
    if not ranks.is_main:
        source = resolve_init_source(init_from, stage, params)
    return source


@contextlib.contextmanager
def _tracked(tracker: TrainingRun | None) -> Iterator[None]:
    """End the MLflow run as FAILED (not left RUNNING) when training raises."""
    try:
        yield
    except BaseException:
        if tracker:
            tracker.finish(status="FAILED")
        raise


def train(stage: str, data_dir: Path | str, run_dir: Path | str, params: Params, max_steps: int | None = None,
          checkpoint_every: int | None = None, resume: str | None = None, init_from: Path | str | None = None,
          init_2d: Path | None = None, text_encoder_dir: Path | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None, track: bool = True,
          embeddings_dir: Path | None = None) -> TrainResult:
    """Train `stage` on the curated clips in `data_dir`; write everything under `run_dir`. The captions are read
    from the text encoder's store under `embeddings_dir` (default `data_dir`/embeddings, made by `show1 embed`) when
    it holds them, else embedded at start (show1.training.captions). With `track`, the run is logged to MLflow
    (params.tracking) and a resumed run continues the same MLflow run. Under torchrun or `accelerate launch`, every
    process calls this; they share each global batch (show1.training.ranks) and only the main process writes or
    calls `on_step`."""
    if stage not in TRAINABLE_STAGES:
        raise ValueError(f"stage '{stage}' cannot be trained here yet (trainable: {', '.join(TRAINABLE_STAGES)})")
    if resume not in (None, "latest"):
        raise ValueError(f"--resume takes 'latest', got {resume!r}")
    cfg: Train = params.train_for(stage)
    if init_from is not None:  # fine-tuning a trained stage: train.finetune's steps and learning rate
        cfg = cfg.fine_tuning()
    max_steps = max_steps or cfg.max_steps
    checkpoint_every = checkpoint_every or cfg.checkpoint_every
    run_dir = Path(run_dir)
    data_dir = str(data_dir) if "://" in str(data_dir) else Path(data_dir)  # a folder, or any fsspec URL (streamed)

    # --- set-up: processes, data, captions, model, optimizer -------------------------------------------------------
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    plan = sharding.plan(cfg.fsdp, cfg.mixed_precision, accelerator)
    lora.check_setup(cfg.lora, init_from, plan.sharded)
    ranks = Ranks(accelerator)
    init = _init_source(init_from, stage, params, ranks)
    per_process = micro_batch(cfg.batch_size, cfg.grad_accum, ranks.world_size)
    torch.manual_seed(cfg.seed)
    files = CuratedFiles(data_dir, cfg.data_cache, cfg.data_cache.dir or params.paths.cache / "streamed")
    index_file = None if files.local else files.index()
    resolutions = curated_sizes(files.root, index_file)
    if not resolutions:
        raise ValueError(f"{files.folder.name(INDEX_PARQUET)} has no clips")
    clips = CuratedClips(data_dir, size=training_size(stage, resolutions), split="train", files=files)
    if not files.local and not cfg.shard_block and ranks.is_main:
        logger.warning("train.shard_block is 0: every clip may follow any other, so a data cache smaller than the data "
                       "set fetches a shard for nearly every clip; set train.shard_block (e.g. 8) for streamed data")
    text_encoder_dir = Path(text_encoder_dir or tiny_text_encoder_dir())
    captions = caption_embeddings(data_dir, clips.captions, text_encoder_dir, embeddings_dir, accelerator.device,
                                  index_file)
    model = load_model(stage, params, captions.dim, init and init.folder, init_2d)
    unet = model.unet
    base = None  # LoRA: the stage folder the adapter adapts (base.json), with the UNet frozen under the adapter
    if cfg.lora is not None:
        assert init is not None  # lora.check_setup
        base = lora.base_record(stage, init.folder, init.reference, init.content_hash)
        lora.add_adapter(unet, cfg.lora)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    if plan.by == "show1":  # before the optimizer sees the parameters
        sharding.shard(unet, cfg.mixed_precision, plan.reshard_after_forward,
                       plan.activation_checkpointing and not cfg.gradient_checkpointing)
    elif plan.by == "accelerate":
        sharding.set_units(unet)  # the blocks accelerate's wrap policy shards
    optimizer = torch.optim.AdamW(lora.trained_parameters(unet, cfg.lora), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    # Not prepared: accelerate would step a prepared schedule once per process. It steps once per optimizer step.
    lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps)
    if plan.by == "show1":
        optimizer = accelerator.prepare(optimizer)  # the UNet is sharded already: not wrapped again
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    trained = accelerator.unwrap_model(unet)  # the module whose parameters (sharded or whole) the optimizer steps
    ema = EMAModel(lora.trained_parameters(trained, cfg.lora), decay=cfg.ema_decay)  # sharded like the parameters
    noise_schedule = model.noise_schedule
    # sr1 noises its condition with IF-II's image-noising schedule; sr2 encodes with its frozen VAE.
    auxiliary = (model.vae.to(accelerator.device) if SPECS[stage].latent
                 else scheduler_from_config(image_noising_scheduler_config()))
    order = DataOrder(len(clips), cfg.seed, shards=clips.index.shard_numbers() if cfg.shard_block else None,
                      block=cfg.shard_block)

    # --- resume: every process from the same checkpoint -----------------------------------------------------------
    step = 0
    if resume == "latest" and (run_dir / "config.json").is_file():
        previous = json.loads((run_dir / "config.json").read_text()).get("stage")
        if previous != stage:
            raise ValueError(f"{run_dir} is a run of stage '{previous}', not '{stage}'")
    if resume == "latest":
        # From the newest checkpoint, or from step 0 when the run was killed before its first one.
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            step = _restore(checkpoint, trained, ema, optimizer, lr_schedule, order, base)
    elif (run_dir / METRICS).is_file() or latest_checkpoint(run_dir):
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume latest, or choose a new --out")
    ranks.wait()  # every process has read the run folder before the main one writes to it
    tracker = None
    if ranks.is_main:
        if resume == "latest" and (run_dir / METRICS).is_file():  # drop rows a killed run wrote after its checkpoint
            kept = [row for row in atomic.read_jsonl(run_dir / METRICS) if row["step"] <= step]
            atomic.write_jsonl(run_dir / METRICS, kept)
        run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, run_dir / CHECKPOINTS):  # what a killed checkpoint or export write left behind
            atomic.remove_stale_folders(folder)
        tracker = (TrainingRun(params, run_dir, stage, data_dir, text_encoder_dir, ranks.world_size,
                               f"fsdp ({plan.by})" if plan.sharded else "none", captions.source, cfg, init)
                   if track else None)
        atomic.write_text(run_dir / "config.json", json.dumps({
            "stage": stage, "params": params.model_dump(mode="json"), "data": str(data_dir),
            "init_from": None if init is None else {"reference": init.reference, "folder": str(init.folder),
                                                    **init.tags()},
            "fingerprint": fingerprint(stage, params, data_dir, max_steps, text_encoder_dir)}, indent=2, default=str))

    # --- the loop ----------------------------------------------------------------------------------------------------
    losses: list[float] = []
    # Unbuffered: each row is appended whole or not at all (`atomic.append`), even when the disk fills up.
    metrics = open(run_dir / METRICS, "ab", buffering=0) if ranks.is_main else None  # noqa: SIM115
    slots = ranks.slots(per_process)
    # From the restored order on: the loader workers decode the next steps' clips (and a streamed folder's shards
    # are fetched) while this step trains.
    batches = ClipBatches(clips, order, per_process * ranks.world_size, slots, cfg.loader_workers,
                          on_ahead=lambda indices: files.prefetch(clips.shards_of(indices)))
    with contextlib.ExitStack() as stack, _tracked(tracker):
        stack.callback(files.close)
        stack.callback(batches.close)
        if metrics is not None:
            stack.enter_context(metrics)
        while step < max_steps:
            started = time.perf_counter()
            local = 0.0  # this process's mean loss over its share of the step
            for micro in range(cfg.grad_accum):
                with accelerator.accumulate(unet):
                    sharding.sync_gradients(trained, accelerator.sync_gradients)  # FSDP: micro-steps stay local
                    chosen = order.take(per_process * ranks.world_size)  # the global micro-batch: same everywhere
                    items = batches.next([chosen[slot] for slot in slots])
                    batch = draw_batch(stage, [item["frames"] for item in items],
                                       [item_generator(cfg.seed, step, micro, slot) for slot in slots], cfg,
                                       noise_schedule, auxiliary)
                    text = captions.lookup([item["caption"] for item in items], batch.dropped)
                    device = accelerator.device
                    labels = {} if batch.class_labels is None else {"class_labels": batch.class_labels.to(device)}
                    prediction = unet(batch.model_input.to(device), batch.timesteps.to(device), text.to(device),
                                      **labels).sample
                    kind = cfg.loss if prediction.shape[1] == 2 * model.eps_channels else "epsilon"
                    loss = diffusion_loss(prediction, batch.noise.to(device), kind, batch.x0.to(device),
                                          batch.noisy.to(device), batch.timesteps.to(device),
                                          noise_schedule.alphas_cumprod, cfg.vlb_weight)
                    accelerator.backward(loss)  # averaged over the processes on the last micro-step only
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
                        optimizer.step()
                        lr_schedule.step()
                        optimizer.zero_grad()
                    local += loss.item() / cfg.grad_accum
            total = ranks.mean(local)  # equal shares: the mean of the processes' means is the global batch's
            ema.step(lora.trained_parameters(trained, cfg.lora))
            step += 1
            if not math.isfinite(total):
                raise FloatingPointError(f"loss became {total} at step {step}: lower train.learning_rate")
            losses.append(total)
            sample_now = bool(cfg.sample_every) and (step % cfg.sample_every == 0 or step == max_steps)
            checkpoint_now = step % checkpoint_every == 0 or step == max_steps
            state = None
            if sample_now or checkpoint_now:  # sharded: every process takes part in gathering, the main one keeps it
                state = sharding.gather(trained, ema.shadow_params, optimizer, plan.sharded, ranks.is_main,
                                        with_optimizer=checkpoint_now)
            if not ranks.is_main:
                continue
            row = {"step": step, "loss": total, "lr": lr_schedule.get_last_lr()[0],
                   "samples_per_s": cfg.batch_size / (time.perf_counter() - started)}
            if accelerator.device.type == "cuda":  # this process's peak, e.g. to compare FSDP with DDP per GPU
                row["gpu_peak_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
            atomic.append(metrics, (json.dumps(row) + "\n").encode("utf-8"), run_dir / METRICS)
            if tracker:
                tracker.log_step(row)
            if on_step:
                on_step(row)
            if sample_now:
                _log_sample(stage, run_dir, step, state, model.vae, clips, captions, cfg.sample_steps, tracker)
            if checkpoint_now:
                _checkpoint(stage, run_dir, step, state, model.vae, ema, lr_schedule, order, cfg.keep_last, base)
    # --- the stage folder ------------------------------------------------------------------------------------------
    final = run_dir / "final"
    state = sharding.gather(trained, ema.shadow_params, optimizer, plan.sharded, ranks.is_main, with_optimizer=False)
    if ranks.is_main:
        _export(stage, run_dir, state, model.vae, base)
        if tracker:
            tracker.finish(final)
    ranks.wait()  # final/ is whole before any process returns it
    return TrainResult(run_dir=run_dir, steps=step, final=final, losses=losses, main_process=ranks.is_main,
                       processes=ranks.world_size, sharding=plan.by, parameters_held=sharding.share_held(trained))


# --- checkpoints --------------------------------------------------------------------------------------------------


def _checkpoint(stage: str, run_dir: Path, step: int, state: sharding.Gathered, vae: Any, ema: EMAModel,
                lr_schedule: Any, order: DataOrder, keep_last: int, base: dict[str, Any] | None = None) -> Path:
    """Write checkpoints/step-N atomically (a temp folder renamed into place), then prune to the last K.

    A checkpoint is a stage folder (the training weights, loadable by the stage's pipeline) plus the EMA
    weights and the training state, whole whether or not the run is sharded. A LoRA run's (`base`) holds the
    adapter and base.json instead of the stage folder: the frozen base is --init-from's."""
    folder = run_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}"
    with atomic.folder_in_place(target) as staging:
        if base is not None:
            lora.save_adapter(state.unet, staging / lora.ADAPTER)
            lora.write_base(staging, base)
        else:
            assemble_stage(stage, state.unet, vae).save_pretrained(staging, safe_serialization=True)
        save_file({f"{i:05d}": p.detach().cpu().contiguous() for i, p in enumerate(state.ema)},
                  str(staging / "ema.safetensors"))
        tensor_tree.save({"optimizer": state.optimizer, "lr_schedule": lr_schedule.state_dict(),
                          "torch_rng": torch.get_rng_state()},
                         staging, TRAINING_STATE)
        (staging / "state.json").write_text(json.dumps({
            "step": step, "data_epoch": order.epoch, "data_offset": order.offset,
            "ema_optimization_step": ema.optimization_step, "ema_decay": ema.decay}))
        fault_point("train.checkpoint.before_seal")
        integrity.seal(staging)
        fault_point("train.checkpoint.before_publish")
    for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep_last]:
        shutil.rmtree(old)
    return target


def _restore(checkpoint: Path, unet: torch.nn.Module, ema: EMAModel, optimizer: Any, lr_schedule: Any,
             order: DataOrder, base: dict[str, Any] | None = None) -> int:
    try:
        check_folder(checkpoint, sealed=True)
    except IntegrityError as exc:
        steps = sorted(p.name for p in checkpoint.parent.glob("step-*") if p != checkpoint)
        hint = f" Delete it to resume from {steps[-1]}." if steps else ""
        raise IntegrityError(f"cannot resume from checkpoint {checkpoint.name}: {exc}.{hint}") from None
    if lora.is_adapter_folder(checkpoint) != (base is not None):
        raise ValueError(f"{checkpoint} is a {'LoRA' if base is None else 'full-training'} checkpoint and train.lora "
                         f"is {'set' if base is not None else 'null'}: resume with the settings the run started with")
    if base is not None:  # the base is --init-from's (the same one); the adapter is the checkpoint's
        lora.check_same_base(checkpoint, base)
        weights = checkpoint / lora.ADAPTER / lora.WEIGHTS
        lora.load_adapter(unet, load_file(str(weights)), str(weights))
    else:
        # Whole tensors in the files; each process keeps its shard when the run is sharded.
        weights = checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
        sharding.load_weights(unet, load_file(str(weights)), str(weights))
    shadow = load_file(str(checkpoint / "ema.safetensors"))
    if len(shadow) != len(ema.shadow_params):
        raise ValueError(f"{checkpoint / 'ema.safetensors'} holds {len(shadow)} tensors, this UNet has "
                         f"{len(ema.shadow_params)} parameters")
    for i, param in enumerate(ema.shadow_params):
        sharding.load_into(param, shadow[f"{i:05d}"])
    if tensor_tree.exists(checkpoint, TRAINING_STATE):
        state = tensor_tree.load(checkpoint, TRAINING_STATE)
    else:  # written by show1 before 0.2: tensors and plain containers only, so weights_only loads it
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    sharding.load_optimizer(optimizer, state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    torch.set_rng_state(state["torch_rng"])
    info = json.loads((checkpoint / "state.json").read_text())
    ema.optimization_step = info["ema_optimization_step"]
    order.epoch, order.offset = info["data_epoch"], info["data_offset"]
    return int(info["step"])


def _ema_copy(state: sharding.Gathered, last_use: bool = False) -> torch.nn.Module:
    """A model holding the EMA weights. A separate one (the training model is left as it is), except on the state's
    `last_use` when it owns its UNet (a sharded run's export): then that copy takes the EMA weights itself, and the
    host holds one whole UNet fewer (7 GB for the paper's base UNet in fp32). With a LoRA adapter: a plain UNet, the
    EMA adapter merged into a copy of the base."""
    if lora.has_adapter(state.unet):
        return lora.merged_copy(state.unet, state.ema).eval()
    if last_use and state.owned:
        ema_unet = state.unet
    else:
        with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
            ema_unet = type(state.unet).from_config(state.unet.config)
        ema_unet.load_state_dict(state.unet.state_dict())
    with torch.no_grad():
        for param, average in zip(ema_unet.parameters(), state.ema, strict=True):
            param.copy_(average)
    return ema_unet.eval()


def _log_sample(stage: str, run_dir: Path, step: int, state: sharding.Gathered, vae: Any, clips: CuratedClips,
                embed: CaptionEmbeddings, steps: int, tracker: TrainingRun | None) -> Path:
    """Write run_dir/samples/step-N.mp4 from the EMA weights for the first clip's caption; log it to MLflow."""
    item = clips[0]
    embeddings = PromptEmbeddings(embed([item["caption"]]), embed([""]))
    frames = sample_video(stage, _ema_copy(state), item["frames"], embeddings, steps, vae)  # forks the RNG
    path = write_video(frames, run_dir / "samples" / f"step-{step:06d}.mp4", fps=7.5)
    if tracker:
        tracker.log_artifact(path, "samples")
    return path


def _export(stage: str, run_dir: Path, state: sharding.Gathered, vae: Any = None,
            base: dict[str, Any] | None = None) -> Path:
    """The EMA weights as a stage folder (issue-3 layout) that the stage's pipeline loads; a LoRA run's (`base`):
    the EMA adapter and base.json (show1.training.lora)."""
    target = run_dir / "final"
    if base is not None:
        with atomic.folder_in_place(target) as staging:
            lora.save_adapter(state.unet, staging / lora.ADAPTER, state.ema)
            lora.write_base(staging, base)
            integrity.seal(staging)
        return target
    pipe = assemble_stage(stage, _ema_copy(state, last_use=True), vae)  # `state` is not used after the export
    with atomic.folder_in_place(target) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        integrity.seal(staging)
    return target
