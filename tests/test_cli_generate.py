"""`show1 init-weights` and `show1 generate`: the commands people run first."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from show1.cli import app
from show1.data.video import VideoFile, write_video
from show1.integrity import CHECKSUMS, seal
from show1.pipelines.keyframes import Show1BasePipeline

runner = CliRunner()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("w")
    result = runner.invoke(app, ["init-weights", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    return folder


def decoded(path: Path) -> np.ndarray:
    with VideoFile(path) as video:
        return np.stack([f.to_ndarray(format="rgb24") for _, f in video.frames_on_grid(video.info.fps)])


def test_generate_writes_29_frames_and_same_seed_gives_same_video(weights, tmp_path):
    args = ["generate", "a paper boat on a pond", "--weights-dir", str(weights), "--stages", "base,interp",
            "--steps", "1", "--seed", "7"]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a.mp4")])
    assert first.exit_code == 0, first.output
    assert "29 frames, 64x40" in first.output
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "b.mp4")]).exit_code == 0
    a, b = decoded(tmp_path / "a.mp4"), decoded(tmp_path / "b.mp4")
    assert a.shape == (29, 40, 64, 3) and np.array_equal(a, b)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    gif = runner.invoke(app, [*args, "--out", str(tmp_path / "c.gif")])
    assert gif.exit_code == 0 and (tmp_path / "c.gif").stat().st_size > 0


def test_the_same_frames_make_the_same_mp4_on_one_core_and_on_all(tmp_path):
    """x264 sizes its thread pool from the cores this thread may run on, and at 576x320 its bitstream depends on the
    thread count: the project pins it, so a video's bytes (and DVC's hash of it) are the same on a laptop and on a
    16-core runner. Here one core vs all of them (the affinity of this thread only; x264's threads inherit it)."""
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        pytest.skip("needs a machine with 2 cores or more")
    noise = np.random.default_rng(0).integers(0, 256, (320, 576, 3), dtype=np.uint8)
    frames = np.stack([np.roll(noise, 4 * k, axis=1) for k in range(29)])
    write_video(frames, tmp_path / "all.mp4")
    os.sched_setaffinity(0, {min(cores)})
    try:
        write_video(frames, tmp_path / "one.mp4")
    finally:
        os.sched_setaffinity(0, cores)
    assert (tmp_path / "all.mp4").read_bytes() == (tmp_path / "one.mp4").read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["   "], "prompt is empty"),
    (["a cat", "--stages", "interp,base"], "out of order"),
    (["a cat", "--dtype", "float8"], "--dtype"),
    (["a cat", "--out", "x.avi"], ".mp4 or .webm or .gif"),
])
def test_generate_bad_input_is_one_clear_line(weights, args, message):
    prompt, *rest = args
    result = runner.invoke(app, ["generate", prompt, "--weights-dir", str(weights), *rest])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_generate_names_a_missing_weights_folder(tmp_path):
    result = runner.invoke(app, ["generate", "a cat", "--weights-dir", str(tmp_path / "none")])
    assert result.exit_code == 2 and "weights folder not found" in result.output


def test_init_weights_refuses_existing_folders(weights):
    result = runner.invoke(app, ["init-weights", "--out", str(weights)])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_base_runs_in_bfloat16(weights):
    pipe = Show1BasePipeline.from_pretrained(weights / "show-1-base", torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    # Small frames: bfloat16 has no fast kernels on most CPUs (the full 8 x 64x40 took ~30 s here).
    frames = pipe("a kite", num_frames=2, height=16, width=16, num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape[-2:] == (16, 16) and pipe.unet.dtype == torch.bfloat16
    assert frames.dtype == torch.bfloat16 and torch.isfinite(frames).all()


def test_generate_takes_the_profiles_denoising_steps_unless_told(weights, tmp_path, mlflow_store):
    """The tiny profile's random stages generate in seconds on a CPU: its evaluate.steps, not the published
    75/75/125/50 (the paper profile's evaluate.steps is null: the published ones); --steps N wins."""
    common = ["--weights-dir", str(weights), "--stages", "base,interp"]
    assert runner.invoke(app, ["generate", "a cat", *common, "--out", str(tmp_path / "a.mp4")]).exit_code == 0
    assert runner.invoke(app, ["generate", "a cat", *common, "--steps", "2", "--out", str(tmp_path / "b.mp4")]
                         ).exit_code == 0
    assert decoded(tmp_path / "a.mp4").tobytes() == decoded(tmp_path / "b.mp4").tobytes()  # tiny: base 2, interp 2
    client = MlflowClient(tracking_uri=mlflow_store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.params["steps"] for r in runs) == ["2", "base=2,interp=2,sr1=1,sr2=2"]


def test_generate_a_prompts_file_in_batches_like_one_prompt_at_a_time(weights, tmp_path, mlflow_store):
    (tmp_path / "prompts.txt").write_text("a paper boat on a pond\n\n  Two dogs  # a comment\na red kite\n")
    common = ["--weights-dir", str(weights), "--stages", "base", "--steps", "1"]
    result = runner.invoke(app, ["generate", "--prompts", str(tmp_path / "prompts.txt"), *common, "--seed", "7",
                                 "--batch-size", "2", "--out", str(tmp_path / "videos")])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "videos").iterdir())
    assert [f.name for f in files] == ["000.mp4", "001.mp4", "002.mp4"]  # no video for the blank line
    alone = []
    for i, prompt in enumerate(["a paper boat on a pond", "Two dogs", "a red kite"]):
        one = runner.invoke(app, ["generate", prompt, *common, "--seed", str(7 + i), "--no-track",
                                  "--out", str(tmp_path / f"alone{i}.mp4")])
        assert one.exit_code == 0, one.output
        alone.append(decoded(tmp_path / f"alone{i}.mp4").astype(int))
    # The last batch holds one prompt: the same computation as generating it alone, so the same frames.
    assert np.array_equal(decoded(files[2]), alone[2])
    # The first two went through the stage together: the same seeds and text, batched float rounding only (the
    # float64 comparison in test_pipelines shows the draws agree to 1e-6).
    for i in (0, 1):
        difference = np.abs(decoded(files[i]).astype(int) - alone[i])
        assert difference.mean() < 1.0, (i, difference.mean())
    client = MlflowClient(tracking_uri=mlflow_store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted((r.data.params["prompt"], r.data.params["seed"], r.data.params["batch_size"]) for r in runs) == [
        ("Two dogs", "8", "2"), ("a paper boat on a pond", "7", "2"), ("a red kite", "9", "2")]


@pytest.mark.parametrize(("args", "message"), [
    ([], "give a PROMPT or --prompts FILE"),
    (["a cat", "--prompts", "p.txt"], "give a PROMPT or --prompts FILE"),
    (["--prompts", "missing.txt"], "--prompts: prompt set 'missing.txt': not a file"),
    (["--prompts", "empty.txt"], "empty.txt: no prompts"),
    (["--prompts", "p.txt", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--prompts", "p.txt", "--out", "v.mp4"], "with --prompts, --out is the folder"),
    (["a cat", "--offload", "model"], "use it with --device cuda"),
    (["a cat", "--offload", "layers"], "--offload 'layers' is not one of none, model, sequential"),
])
def test_generate_prompts_and_offload_errors_are_one_clear_line(weights, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    result = runner.invoke(app, ["generate", *args, "--weights-dir", str(weights)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


@pytest.mark.parametrize(("sealing", "message"), [
    ("none", "damaged safetensors file (truncated"),  # published weights come unsealed: the header check names it
    ("kept", "does not match its recorded content hash"),
    ("resealed", "damaged safetensors file (truncated"),  # sealed over a cut file, as convert-weights used to do
])
def test_generate_names_a_truncated_weights_file_in_one_line(weights, tmp_path, sealing, message):
    base = tmp_path / "w" / "show-1-base"
    shutil.copytree(weights / "show-1-base", base)
    unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    if sealing == "none":
        (base / CHECKSUMS).unlink()
    elif sealing == "resealed":
        seal(base)
    result = runner.invoke(app, ["generate", "a cat", "--weights-dir", str(tmp_path / "w"), "--stages", "base",
                                 "--out", str(tmp_path / "v.mp4"), "--no-track"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "unet/diffusion_pytorch_model.safetensors" in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "v.mp4").exists()
