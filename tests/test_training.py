"""The trainer on the real curated demo clips: atomic checkpoints, tracking, fine-tuning, and a trained stage folder
that the pipeline loads. Overfitting: test_training_overfit.py; kill -9 and exact resume: tests/reliability/."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from show1.models.text import load_text_encoder, tiny_text_encoder_dir
from show1.pipelines.keyframes import Show1BasePipeline
from show1.training.trainer import latest_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(training_setup, tmp_path):
    folder, params = training_setup
    run = tmp_path / "run"
    train("base", folder / "curated", run, params, max_steps=2, checkpoint_every=2)
    # What a kill during the next checkpoint write leaves: a half-written staging folder.
    partial = run / "checkpoints" / ".step-000004.tmp-abc"
    (partial / "unet").mkdir(parents=True)
    (partial / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    assert latest_checkpoint(run).name == "step-000002"
    resumed = train("base", folder / "curated", run, params, max_steps=3, checkpoint_every=2, resume="latest")
    assert resumed.steps == 3 and len(resumed.losses) == 1


def test_a_finished_run_refuses_to_be_overwritten_or_resumed_as_another_stage(training_setup, tmp_path):
    folder, params = training_setup
    train("base", folder / "curated", tmp_path / "run", params, max_steps=1)
    with pytest.raises(FileExistsError, match="--resume latest"):
        train("base", folder / "curated", tmp_path / "run", params, max_steps=1)
    with pytest.raises(ValueError, match="run of stage 'base'"):
        train("interp", folder / "curated", tmp_path / "run", params, max_steps=2, resume="latest")


def test_trained_stage_folder_generates_through_the_pipeline(training_setup, tmp_path):
    folder, params = training_setup
    result = train("base", folder / "curated", tmp_path / "run", params, max_steps=2)
    tokenizer, encoder = load_text_encoder(tiny_text_encoder_dir())
    pipe = Show1BasePipeline.from_pretrained(result.final)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a rabbit on a hill", num_inference_steps=2, height=20, width=32,
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 3, 8, 20, 32) and torch.isfinite(frames).all()


def test_fine_tuning_starts_from_a_stage_folder(training_setup, tmp_path):
    folder, params = training_setup
    first = train("base", folder / "curated", tmp_path / "a", params, max_steps=1)
    tuned = train("base", folder / "curated", tmp_path / "b", params, max_steps=1, init_from=first.final)
    assert tuned.steps == 1
    shutil.rmtree(tmp_path / "a")


def test_training_is_tracked_in_mlflow_and_a_resume_continues_the_run(training_setup, tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    folder, params = training_setup
    train("base", folder / "curated", tmp_path / "run", params, max_steps=2, checkpoint_every=2)
    train("base", folder / "curated", tmp_path / "run", params, max_steps=3, resume="latest")
    client = MlflowClient(tracking_uri=mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name(params.tracking.experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["stage"] == "base" and len(run.data.tags["data_version"]) == 64
    assert run.data.tags["git_commit"] and run.data.params["train.learning_rate"] == "0.001"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert run.data.tags["final_stage_folder"].endswith("final")
    # Sample videos from the EMA weights at the end of each call (sample_every is larger than the run).
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/step-000002.mp4", "samples/step-000003.mp4"]
    sample = tmp_path / "run" / "samples" / "step-000003.mp4"
    from show1.data.video import probe

    assert probe(sample).width == 32 and probe(sample).height == 20


def test_a_resume_logs_each_step_to_mlflow_once_when_the_killed_run_logged_past_its_checkpoint(
        training_setup, tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    folder, params = training_setup
    run = tmp_path / "run"
    train("base", folder / "curated", run, params, max_steps=3, checkpoint_every=2)
    logged = [(row["step"], row["loss"]) for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    # What a kill after step 3 was logged (to metrics.jsonl and MLflow) but before its checkpoint was written leaves.
    shutil.rmtree(run / "checkpoints" / "step-000003")
    shutil.rmtree(run / "final")
    assert latest_checkpoint(run).name == "step-000002"
    resumed = train("base", folder / "curated", run, params, max_steps=3, checkpoint_every=2, resume="latest")
    assert resumed.steps == 3 and len(resumed.losses) == 1  # step 3 trained again
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["loss"]) for row in rows] == logged  # step 3 recomputed: the same loss
    client = MlflowClient(tracking_uri=mlflow_store)
    (tracked,) = client.search_runs([client.get_experiment_by_name(params.tracking.experiment).experiment_id])
    for key in ("loss", "lr", "samples_per_s"):
        history = client.get_metric_history(tracked.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3], key
    assert [(m.step, m.value) for m in client.get_metric_history(tracked.info.run_id, "loss")] == logged


def test_sr2_trains_only_on_timesteps_below_900_and_pixel_stages_on_all(training_setup):
    from diffusers import DDPMScheduler

    from show1.training.trainer import training_timesteps

    _, params = training_setup
    schedule = DDPMScheduler(num_train_timesteps=1000)
    sr2 = training_timesteps("sr2", params.train, schedule, 20_000, torch.Generator().manual_seed(0))
    base = training_timesteps("base", params.train, schedule, 20_000, torch.Generator().manual_seed(0))
    assert sr2.max() == params.train.sr2_max_timestep - 1 == 899 and sr2.min() == 0
    assert base.max() == 999


def test_trained_sr2_folder_loads_into_its_pipeline(training_setup, tmp_path):
    from show1.pipelines.sr2 import Show1SR2Pipeline

    folder, params = training_setup
    result = train("sr2", folder / "curated", tmp_path / "run", params, max_steps=1)
    pipe = Show1SR2Pipeline.from_pretrained(result.final)
    assert pipe.vae is not None and pipe.unet.config.in_channels == 4


def test_a_checkpoint_loads_straight_into_the_stage_pipeline(training_setup, tmp_path):
    from show1.pipelines.sr1 import Show1SR1Pipeline

    folder, params = training_setup
    train("sr1", folder / "curated", tmp_path / "run", params, max_steps=1)
    checkpoint = latest_checkpoint(tmp_path / "run")
    pipe = Show1SR1Pipeline.from_pretrained(checkpoint)
    assert pipe.unet.config.class_embed_type == "timestep"


def test_every_trainable_stage_has_one_spec_and_one_sampler():
    from show1.training.runs import TRAINABLE_STAGES
    from show1.training.samples import SAMPLERS
    from show1.training.specs import SPECS

    assert tuple(SPECS) == TRAINABLE_STAGES == tuple(SAMPLERS)
    assert [stage for stage, spec in SPECS.items() if spec.latent] == ["sr2"]  # the latent expert translator
    assert [stage for stage, spec in SPECS.items() if spec.size == "largest"] == ["sr1", "sr2"]
