"""A registered stage as an MLflow `pyfunc`: the stage pipeline behind `predict`, its folder as the artifacts.

Input: a DataFrame with a `prompt` column and, for every stage after base, a `video` column holding the
previous stage's video. Output: a DataFrame with `video`, `frames`, `height`, `width`. Videos travel as
uint8 arrays (frames, height, width, 3) in `.npy` bytes (`encode_video` / `decode_video`), so one stage's
output is the next stage's input, in process or through a REST endpoint (binary columns are base64 there).
Params: `seed`, `num_inference_steps`, `guidance_scale` (sr1 `noise_level`, sr2 `strength`), defaulting to
the published settings. A LoRA adapter version loads its base version's model and merges the adapter into its UNet.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from show1.models.configs import DEFAULTS

STAGE_ARTIFACT = "stage"  # the key of the stage folder in the model's artifacts
# A LoRA adapter version (show1.training.lora): its artifacts hold the adapter only; the tags name its base version,
# and its model_config the base model (`base_model`), which loading merges the adapter into.
ADAPTER_TAG, BASE_VERSION_TAG, BASE_HASH_TAG = "show1.adapter", "show1.base_version", "show1.base_content_hash"
BASE_MODEL = "base_model"
EXAMPLE_PROMPT = "a cartoon rabbit hops through a sunny meadow"
# The video each stage takes (frames, height, width) at every profile: base's 64x40 keyframes, sr1's 256x160.
EXAMPLE_INPUT: dict[str, tuple[int, int, int]] = {"interp": (8, 40, 64), "sr1": (8, 40, 64), "sr2": (2, 160, 256)}
STAGE_OPTIONS = {"sr1": ("noise_level", "long"), "sr2": ("strength", "double")}


def encode_video(frames: np.ndarray) -> bytes:
    """uint8 (frames, height, width, 3) → `.npy` bytes (no pickle)."""
    frames = _checked(np.asarray(frames), "video")
    buffer = io.BytesIO()
    np.save(buffer, frames, allow_pickle=False)
    return buffer.getvalue()


def decode_video(data: bytes | bytearray | memoryview | str, name: str = "video") -> np.ndarray:
    """`.npy` bytes (or their base64 text) → uint8 (frames, height, width, 3); a clear error otherwise."""
    if isinstance(data, str):
        import base64
        import binascii

        try:
            data = base64.b64decode(data, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"{name}: not .npy bytes nor base64 of them") from exc
    try:
        array = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{name}: not a .npy array of video frames ({exc})") from exc
    return _checked(array, name)


def _checked(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or 0 in array.shape:
        raise ValueError(f"{name}: expected uint8 frames of shape (frames, height, width, 3), "
                         f"got {array.dtype} {tuple(array.shape)}")
    return array


def signature(stage: str) -> Any:
    """The model signature: columns in and out, and the generation settings as params with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    columns = [ColSpec("string", "prompt")]
    if stage != "base":
        columns.append(ColSpec("binary", "video"))
    params = [ParamSpec("seed", "long", 0),
              ParamSpec("num_inference_steps", "long", DEFAULTS[stage]["num_inference_steps"]),
              ParamSpec("guidance_scale", "double", float(DEFAULTS[stage]["guidance_scale"]))]
    if stage in STAGE_OPTIONS:
        option, kind = STAGE_OPTIONS[stage]
        default = DEFAULTS[stage][option]
        params.append(ParamSpec(option, kind, float(default) if kind == "double" else int(default)))
    outputs = Schema([ColSpec("binary", "video"), ColSpec("long", "frames"), ColSpec("long", "height"),
                      ColSpec("long", "width")])
    return ModelSignature(inputs=Schema(columns), outputs=outputs, params=ParamSchema(params))


def input_example(stage: str) -> Any:
    """A prompt (and, after base, a mid-gray video of the size the stage takes)."""
    import pandas as pd

    row: dict[str, Any] = {"prompt": EXAMPLE_PROMPT}
    if stage != "base":
        row["video"] = encode_video(np.full((*EXAMPLE_INPUT[stage], 3), 128, dtype=np.uint8))
    return pd.DataFrame([row])


def to_pipeline_video(frames: np.ndarray) -> Any:
    """uint8 (F, H, W, 3) → float (1, 3, F, H, W) in [-1, 1], as the stage pipelines take it."""
    import torch

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1
    return video.unsqueeze(0)


# MLflow asks for type hints on predict to infer a signature; show1 gives an explicit one instead.
warnings.filterwarnings("ignore", message="Add type hints to the `predict` method", category=UserWarning)


class Show1StageModel(mlflow.pyfunc.PythonModel):
    """The pyfunc python model; `model_config`: {"stage": ..., "device": "auto" | "cpu"}."""

    stage: str
    pipeline: Any

    def load_context(self, context: Any) -> None:
        import torch

        from show1.pipelines.cascade import STAGE_PIPELINES

        self.stage = context.model_config["stage"]
        folder = Path(context.artifacts[STAGE_ARTIFACT])
        base_model = context.model_config.get(BASE_MODEL)
        if base_model:  # a LoRA adapter version: its base version's pipeline, the adapter merged into the UNet
            import mlflow.artifacts

            from show1.training.lora import ADAPTER, apply_adapter

            base = Path(mlflow.artifacts.download_artifacts(artifact_uri=base_model)) / "artifacts" / STAGE_ARTIFACT
            self.pipeline = STAGE_PIPELINES[self.stage].from_pretrained(base)
            apply_adapter(self.pipeline.unet, folder / ADAPTER)  # in place
        else:
            self.pipeline = STAGE_PIPELINES[self.stage].from_pretrained(folder)
        self.pipeline.set_progress_bar_config(disable=True)
        if torch.cuda.is_available() and context.model_config.get("device", "auto") != "cpu":
            self.pipeline.to("cuda")

    # No type hints on purpose: MLflow would infer a (wrong) signature from them; the signature is explicit.
    def predict(self, context, model_input, params=None):
        import pandas as pd

        from show1.data.video import to_uint8_frames
        from show1.pipelines.cascade import run_stage
        from show1.pipelines.seeding import Reseeding

        settings = dict(params or {})
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        seed = int(settings.pop("seed", 0))
        steps = settings.pop("num_inference_steps", None)
        guidance = settings.pop("guidance_scale", None)
        outputs = []
        for i, row in enumerate(rows):
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"row {i}: 'prompt' must be a non-empty string")
            video = None
            if self.stage != "base":
                if row.get("video") is None:
                    raise ValueError(f"row {i}: the {self.stage} stage needs a 'video' column "
                                     "(the previous stage's output, .npy bytes)")
                video = to_pipeline_video(decode_video(row["video"], f"row {i} video"))
            # The reference's seeding: each stage model of a chain, given one seed, gives the cascade's video.
            frames = run_stage(self.stage, self.pipeline, prompt, video, None,
                               None if steps is None else int(steps),
                               None if guidance is None else float(guidance), Reseeding(seed + i), **settings)
            array = to_uint8_frames(frames[0].permute(1, 0, 2, 3))
            outputs.append({"video": encode_video(array), "frames": array.shape[0],
                            "height": array.shape[1], "width": array.shape[2]})
        return pd.DataFrame(outputs, columns=["video", "frames", "height", "width"])
