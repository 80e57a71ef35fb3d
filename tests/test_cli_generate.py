"""`show1 init-weights` and `show1 generate`: the commands people run first."""

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from show1.cli import app
from show1.data.video import VideoFile
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
    gif = runner.invoke(app, [*args, "--out", str(tmp_path / "c.gif")])
    assert gif.exit_code == 0 and (tmp_path / "c.gif").stat().st_size > 0


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
