"""Faults in training: a run killed while writing a checkpoint, or at random moments, resumes bit-exactly (the same
loss at every step, the same final weights as an uninterrupted run); a checkpoint whose content does not match its
seal refuses to load, with the file named. See test_faults.py for SHOW1_SOAK_ROUNDS."""

from __future__ import annotations

import json
import random
import shutil
import signal
import sys
from pathlib import Path

import pytest
import yaml
from processes import REPO, ROUNDS, SEED, TRAINING_SMALL, killed_at_random, show1
from typer.testing import CliRunner

from show1.cli import app
from show1.config import load_params
from show1.data.curate import curate
from show1.integrity import IntegrityError
from show1.pipelines.keyframes import Show1BasePipeline

runner = CliRunner()

# ------------------------------------------------------------------------------------------------ training

SMALL = TRAINING_SMALL


@pytest.fixture(scope="module")
def training(tmp_path_factory) -> dict[str, Path]:
    """Curated demo clips and one uninterrupted 6-step base run (checkpoints at 2, 4, 6), from the CLI."""
    folder = tmp_path_factory.mktemp("training")
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(SMALL | {"tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"}}))
    curate(REPO / "data/manifests/demo.csv", folder / "curated", load_params(params_file))
    whole = train_cli(params_file, folder / "curated", folder / "whole")
    assert whole.returncode == 0, whole.stderr
    return {"params": params_file, "data": folder / "curated", "whole": folder / "whole"}


def train_cli(params: Path, data: Path, out: Path, *extra: str, fault: str | None = None):
    return show1(params, "train", "--stage", "base", "--data", str(data), "--out", str(out), "--max-steps", "6",
                 "--checkpoint-every", "2", "--no-track", *extra, fault=fault)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def assert_same_run(run: Path, whole: Path) -> None:
    assert losses(run) == losses(whole)  # every step once, bit for bit
    for name in ("unet/diffusion_pytorch_model.safetensors",):
        assert (run / "final" / name).read_bytes() == (whole / "final" / name).read_bytes()
    assert [p.name for p in run.rglob("*") if ".tmp-" in p.name] == []


@pytest.mark.parametrize("fault", ["train.checkpoint.before_seal@2", "train.checkpoint.before_publish@2"])
def test_training_killed_while_writing_a_checkpoint_resumes_bit_exactly(training, tmp_path, fault):
    run = tmp_path / "run"
    killed = train_cli(training["params"], training["data"], run, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002"]
    assert list((run / "checkpoints").glob(".step-000004.tmp-*")), "the kill should leave a staging folder"
    resumed = train_cli(training["params"], training["data"], run, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, training["whole"])


@pytest.mark.soak
def test_training_killed_at_random_moments_resumes_bit_exactly(training, tmp_path):
    rng = random.Random(SEED)
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "show1.cli", "--params", str(training["params"]), "train", "--stage", "base",
            "--data", str(training["data"]), "--out", str(run), "--max-steps", "6", "--checkpoint-every", "2",
            "--no-track"]
    for round_ in range(ROUNDS):
        resume = ["--resume", "latest"] if round_ else []
        killed_at_random([*argv, *resume], rng, "step", window_s=1.5)
    resumed = train_cli(training["params"], training["data"], run, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, training["whole"])


def test_a_checkpoint_that_does_not_match_its_content_hash_refuses_to_load(training, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(training["whole"], run)
    weights = run / "checkpoints" / "step-000006" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    result = runner.invoke(app, ["--params", str(training["params"]), "train", "--stage", "base", "--data",
                                 str(training["data"]), "--out", str(run), "--max-steps", "8", "--resume", "latest"])
    assert result.exit_code == 2, result.output
    assert "unet/diffusion_pytorch_model.safetensors does not match its recorded content hash" in result.output
    assert "Delete it to resume from step-000004" in result.output and "Traceback" not in result.output

    final = run / "final" / "unet" / "diffusion_pytorch_model.safetensors"
    final.write_bytes(final.read_bytes()[:-1] + bytes([final.read_bytes()[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="refusing to load"):
        Show1BasePipeline.from_pretrained(run / "final")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    registered = runner.invoke(app, ["--params", str(training["params"]), "register", "--stage", "base",
                                     "--checkpoint", str(run / "final")])
    assert registered.exit_code != 0 and "does not match its recorded content hash" in registered.output


