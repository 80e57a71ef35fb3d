"""Data-parallel training with real processes (gloo on the CPU, 2 ranks): one global batch split across the ranks
gives the one-process losses and weights; one writer (one metrics row per step, one MLflow run); a kill -9 of the
whole process group resumes bit-exactly, here under the other launcher (`accelerate launch`). FSDP (the UNet, its
EMA and optimizer state sharded over the ranks) gives the same numbers, and its checkpoints are whole stage folders:
a sharded run resumes from them bit-exactly, and an unsharded run from them too."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from training_runs import EVERY, ROOT, SMALL, STEPS, WEIGHTS, environment, rows, worst_difference

from show1 import tensor_tree
from show1.config import load_params
from show1.data.curate import curate
from show1.models.unet_3d_condition import ShowOneUNet3DConditionModel
from show1.training import sharding
from show1.training.ranks import BatchSplitError, micro_batch
from show1.training.trainer import TRAINING_STATE, train
from show1.weight_files import check_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ddp")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    (folder / "params.yaml").write_text(yaml.safe_dump(SMALL | {"tracking": {"uri": store}}))
    curate(ROOT / "data/manifests/demo.csv", folder / "curated", load_params(folder / "params.yaml"))
    return {"folder": folder, "params": folder / "params.yaml", "data": folder / "curated"}


def train_args(setup: dict[str, Path], out: Path, *extra: str, params: Path | None = None) -> list[str]:
    return ["show1.cli", "--params", str(params or setup["params"]), "train", "--stage", "base", "--data",
            str(setup["data"]), "--out", str(out), "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), *extra]


def torchrun(setup: dict[str, Path], out: Path, *extra: str, params: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            *train_args(setup, out, *extra, params=params)]


def accelerate_launch(setup: dict[str, Path], out: Path, *extra: str, config: Path | None = None) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes 2` (or `--config_file CONFIG`): 2 processes on a machine
    without GPUs too (gloo)."""
    kind = ["--config_file", str(config)] if config else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *kind, "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", *train_args(setup, out, *extra)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two(setup) -> subprocess.CompletedProcess:
    """An uninterrupted run with 2 processes (torchrun), tracked."""
    return subprocess.run(torchrun(setup, setup["folder"] / "two"), capture_output=True, text=True, timeout=900,
                          env=environment(), cwd=setup["folder"])


@pytest.fixture(scope="module")
def one(setup):
    """The same run in this process: one process, the whole UNet."""
    return train("base", setup["data"], setup["folder"] / "one", load_params(setup["params"]), max_steps=STEPS,
                 checkpoint_every=EVERY, track=False)


def test_two_processes_train_on_one_global_batch_like_one_process(setup, two, one):
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    run = setup["folder"] / "two"
    assert [r["step"] for r in rows(run)] == list(range(1, STEPS + 1))  # one writer: one row per step
    assert [r["loss"] for r in rows(run)] == pytest.approx(one.losses, rel=1e-4, abs=1e-4)
    worst = worst_difference(run, one.run_dir)
    assert worst < 1e-4, worst
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert two.stdout.count(f"trained base for {STEPS} steps") == 1  # the main process reports; the other is quiet
    assert "2 processes, data-parallel: each held the whole UNet" in two.stdout
    client = MlflowClient(tracking_uri=yaml.safe_load(setup["params"].read_text())["tracking"]["uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.params["world_size"] == "2", [r.info.run_name for r in runs]
    assert runs[0].data.params["sharding"] == "none"
    assert len(runs[0].data.metrics) and client.get_metric_history(runs[0].info.run_id, "loss")[-1].step == STEPS


def test_set_ups_the_trainer_cannot_run_are_refused_with_the_reason(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    for kind in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        assert not sharding.plan(False, "no", SimpleNamespace(distributed_type=kind)).sharded
        assert sharding.plan(True, "bf16", SimpleNamespace(distributed_type=kind)).by == "show1"
    for other in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        with pytest.raises(ValueError, match=f"configured for {other.value}: show1's trainer runs"):
            sharding.plan(False, "no", SimpleNamespace(distributed_type=other))
    with pytest.raises(ValueError, match="FSDP version 1: show1 shards with FSDP2"):
        sharding.plan(False, "no", SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False))
    with pytest.raises(ValueError, match="'fp16' with FSDP"):
        sharding.plan(True, "fp16", SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_a_batch_the_processes_cannot_share_is_refused(setup, tmp_path):
    assert micro_batch(8, 2, 2) == 2 and micro_batch(4, 1, 4) == 1
    with pytest.raises(BatchSplitError, match=r"train\.batch_size 6 is the global batch .* 2 × 2 = 4"):
        micro_batch(6, 2, 2)
    params = yaml.safe_load(setup["params"].read_text())
    params["train"] |= {"batch_size": 3, "grad_accum": 2}  # one process cannot split 3 clips into 2 micro-steps
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(BatchSplitError, match=r"train\.batch_size 3 is the global batch"):
        train("base", setup["data"], tmp_path / "run", load_params(tmp_path / "params.yaml"), track=False)
    assert not (tmp_path / "run").exists()


def test_kill_9_of_the_process_group_resumes_bit_exactly(setup, two, tmp_path):
    assert two.returncode == 0
    run = tmp_path / "run"
    # Killed with SIGKILL, the launcher and both ranks at once, once step 3 is written (the step-2 checkpoint is).
    # torchrun starts each rank in a session of its own: the ranks are killed by pid, not through the launcher's group.
    group = subprocess.Popen(torchrun(setup, run, "--no-track"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=environment(), cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and group.poll() is None:
            if (run / "metrics.jsonl").is_file() and len(rows(run)) >= 3:
                ranks = psutil.Process(group.pid).children(recursive=True)
                os.killpg(group.pid, signal.SIGKILL)
                for rank in ranks:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        rank.kill()
                psutil.wait_procs(ranks, timeout=60)
                break
            time.sleep(0.02)
        group.wait(timeout=60)
    finally:
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
            group.wait()
    assert group.returncode == -signal.SIGKILL and not (run / "final").exists()
    assert len(rows(run)) < STEPS

    resumed = subprocess.run(accelerate_launch(setup, run, "--no-track", "--resume", "latest"), capture_output=True,
                             text=True, timeout=900, env=environment(), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    whole = setup["folder"] / "two"
    assert rows(run) and [(r["step"], r["loss"]) for r in rows(run)] == [(r["step"], r["loss"]) for r in rows(whole)]
    assert (run / WEIGHTS).read_bytes() == (whole / WEIGHTS).read_bytes()


@pytest.fixture(scope="module")
def sharded(setup) -> tuple[subprocess.CompletedProcess, Path]:
    """A sharded run: torchrun with train.fsdp (show1 shards with torch's FSDP2)."""
    run, params = setup["folder"] / "fsdp", setup["folder"] / "fsdp.yaml"
    params.write_text(yaml.safe_dump(SMALL | {"train": SMALL["train"] | {"fsdp": True}}))
    return subprocess.run(torchrun(setup, run, "--no-track", params=params), capture_output=True, text=True,
                          timeout=900, env=environment(), cwd=setup["folder"]), run


def test_fsdp_shards_the_unet_and_trains_like_one_process_into_whole_checkpoints(setup, sharded, one):
    done, run = sharded
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 processes, FSDP (sharded by show1): each held 50% of the UNet's parameters" in done.stdout
    assert [r["step"] for r in rows(run)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows(run)] == pytest.approx(one.losses, rel=1e-4, abs=1e-4)
    worst = worst_difference(run, one.run_dir)  # the EMA weights, gathered from the shards into final/
    assert worst < 1e-4, worst
    # Every checkpoint is a whole stage folder and training state, like the unsharded run's.
    checkpoint, unsharded = run / "checkpoints/step-000002", one.run_dir / "checkpoints/step-000002"
    check_folder(checkpoint, sealed=True)
    ShowOneUNet3DConditionModel.from_pretrained(checkpoint / "unet", use_safetensors=True)
    assert worst_difference(checkpoint, unsharded, "unet/diffusion_pytorch_model.safetensors") < 1e-4
    assert worst_difference(checkpoint, unsharded, "ema.safetensors") < 1e-4
    mine, theirs = (tensor_tree.load(folder, TRAINING_STATE)["optimizer"] for folder in (checkpoint, unsharded))
    assert mine["param_groups"] == theirs["param_groups"] and mine["state"].keys() == theirs["state"].keys()
    for index, moments in theirs["state"].items():
        assert {k: v.shape for k, v in mine["state"][index].items()} == {k: v.shape for k, v in moments.items()}


def test_fsdp_resumes_bit_exactly_and_its_checkpoints_resume_unsharded(setup, sharded, one, tmp_path):
    done, whole = sharded
    assert done.returncode == 0
    # The sharded run stopped after step 2 (its last checkpoint and final/ gone), resumed with the shipped FSDP
    # accelerate config (on CPU processes accelerate does not shard: show1 does, with the config's activation
    # checkpointing, each block wrapped as accelerate wraps it): each process scatters its shard of the whole
    # checkpoint back (weights, EMA, AdamW moments), and the run repeats the uninterrupted one bit for bit.
    run = tmp_path / "resumed"
    shutil.copytree(whole, run, ignore=shutil.ignore_patterns("final", "step-000004"))
    launch = accelerate_launch(setup, run, "--no-track", "--resume", "latest",
                               config=ROOT / "configs/accelerate/fsdp.yaml")
    resumed = subprocess.run(launch, capture_output=True, text=True, timeout=900, env=environment(), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "2 processes, FSDP (sharded by show1): each held 50% of the UNet's parameters" in resumed.stdout
    assert [(r["step"], r["loss"]) for r in rows(run)] == [(r["step"], r["loss"]) for r in rows(whole)]
    assert (run / WEIGHTS).read_bytes() == (whole / WEIGHTS).read_bytes()
    # One process without FSDP resumes from the sharded run's step-2 checkpoint: the one-process run's numbers.
    alone = tmp_path / "alone"
    shutil.copytree(whole, alone, ignore=shutil.ignore_patterns("final", "step-000004"))
    result = train("base", setup["data"], alone, load_params(setup["params"]), max_steps=STEPS,
                   checkpoint_every=EVERY, resume="latest", track=False)
    assert result.losses == pytest.approx(one.losses[2:], rel=1e-4, abs=1e-4)
    worst = worst_difference(alone, one.run_dir)
    assert worst < 1e-4, worst


def test_the_fsdp_config_wraps_the_blocks_show1_shards_in_both_kinds_of_unet():
    """On GPUs accelerate shards (its FSDP2 plugin's wrap policy reads the UNet's `_no_split_modules`); checked here
    on the CPU: the shipped config's policy picks exactly the blocks show1 shards itself, for the pixel UNets and
    for sr2's diffusers UNet (an unknown block name would make accelerate refuse to start)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from show1.models.configs import pixel_unet_config
    from show1.pipelines.sr2 import tiny_sr2_components

    config = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2,
                                            auto_wrap_policy=config["fsdp_config"]["fsdp_auto_wrap_policy"].lower())
    for unet in (ShowOneUNet3DConditionModel.from_config(pixel_unet_config("base", "tiny", 32)),
                 tiny_sr2_components(32)["unet"]):
        units = sharding.set_units(unet)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, unet)
        chosen = [module for module in unet.modules() if policy(module)]
        assert chosen and {type(module).__name__ for module in chosen} == set(units), type(unet).__name__
        assert len(chosen) == sum(type(module).__name__ in units for module in unet.modules())
