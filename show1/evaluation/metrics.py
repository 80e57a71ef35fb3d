"""Video metrics over numpy videos: FID-vid, FVD, CLIPSIM, Inception Score and temporal consistency.

A video is a uint8 array (T, H, W, 3). Each metric takes its feature network as an argument (see features.py), so
the same code runs with the real networks and with small ones in tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_softmax, logsumexp

from show1.evaluation.features import (
    ClipModel,
    FrameFeatures,
    TorchScriptClassifier,
    VideoFeatures,
    check_frames,
    check_output,
    describe,
)
from show1.evaluation.frechet import FeatureStats, frechet_distance


def check_videos(videos: Any, what: str = "videos") -> list[np.ndarray]:
    """`videos` if it is a non-empty list of uint8 videos (T, H, W, 3), else a ValueError that says what is wrong."""
    if not isinstance(videos, list | tuple) or not videos:
        raise ValueError(f"expected {what} as a non-empty list of uint8 videos (T, H, W, 3), got {describe(videos)}")
    return [check_frames(video, f"{what}[{index}]", "(T, H, W, 3)") for index, video in enumerate(videos)]


def frames_of(videos: list[np.ndarray]) -> np.ndarray:
    """All frames of videos of one frame size, concatenated into (N, H, W, 3)."""
    videos = check_videos(videos)
    sizes = sorted({video.shape[1:3] for video in videos})
    if len(sizes) > 1:
        raise ValueError(f"videos differ in frame size (H, W): {sizes}")
    return np.concatenate(videos)


def frame_features(videos: list[np.ndarray], features: FrameFeatures, what: str = "videos") -> np.ndarray:
    """Features (N, D) of every frame of `videos`; videos of different sizes go through the network separately."""
    by_size: dict[tuple[int, ...], list[np.ndarray]] = {}
    for video in check_videos(videos, what):
        by_size.setdefault(video.shape[1:3], []).append(video)
    parts = []
    for group in by_size.values():
        frames = frames_of(group)
        parts.append(check_output(features(frames), len(frames), features.name))
    return np.concatenate(parts)


def fid_vid(generated: list[np.ndarray], reference: list[np.ndarray], features: FrameFeatures) -> float:
    """FID-vid as Show-1 reports it: the Fréchet distance between the per-frame features of all frames of each set."""
    stats = []
    for what, videos in (("generated", generated), ("reference", reference)):
        values = frame_features(videos, features, what)
        if len(values) < 2:
            raise ValueError(f"FID-vid needs at least 2 {what} frames in all, got {len(values)}")
        stats.append(FeatureStats.from_features(values))
    return frechet_distance(*stats)


def fvd(generated: list[np.ndarray], reference: list[np.ndarray], features: VideoFeatures) -> float:
    """Fréchet Video Distance: the Fréchet distance between per-video features (I3D for the published numbers)."""
    stats = []
    for what, videos in (("generated", generated), ("reference", reference)):
        videos = check_videos(videos, what)
        if len(videos) < 2:
            raise ValueError(f"FVD needs at least 2 {what} videos, got {len(videos)}")
        stats.append(FeatureStats.from_features(check_output(features(videos), len(videos), features.name)))
    return frechet_distance(*stats)


def clipsim(video: np.ndarray, prompt: str, clip: ClipModel) -> float:
    """CLIPSIM: the mean over frames of the cosine similarity between each frame and the prompt (in [-1, 1])."""
    video = check_frames(video, "video", "(T, H, W, 3)")
    if not isinstance(prompt, str):
        raise ValueError(f"expected the prompt as a string, got {describe(prompt)}")
    images = clip.image_features(video).astype(np.float64)
    text = clip.text_features([prompt])[0].astype(np.float64)
    return float(np.clip((images @ text).mean(), -1.0, 1.0))


def inception_score(frames: np.ndarray, classifier: TorchScriptClassifier, splits: int = 1) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of each of `splits` parts of `frames`; their mean and std."""
    frames = check_frames(frames)
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= len(frames):
        raise ValueError(f"splits must be an integer from 1 to the number of frames ({len(frames)}), got {splits!r}")
    logits = check_output(classifier.logits(frames), len(frames), classifier.name).astype(np.float64)
    log_p = log_softmax(logits, axis=1)
    scores = []
    for part in np.array_split(log_p, splits):
        log_marginal = logsumexp(part, axis=0) - np.log(len(part))
        scores.append(np.exp((np.exp(part) * (part - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def temporal_consistency(video: np.ndarray, features: FrameFeatures) -> float:
    """Mean cosine similarity of consecutive frames' features: 1.0 for a static video, lower as content changes."""
    video = check_frames(video, "video", "(T, H, W, 3)")
    if len(video) < 2:
        raise ValueError(f"temporal consistency needs a video of at least 2 frames, got {len(video)}")
    return consecutive_similarity(check_output(features(video), len(video), features.name), features.name)


def consecutive_similarity(values: np.ndarray, source: str = "features") -> float:
    """Mean cosine similarity of consecutive rows of (T, D) per-frame features (T >= 2)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) < 2:
        raise ValueError(f"expected (frames >= 2, D) {source} features, got shape {values.shape}")
    norms = np.linalg.norm(values, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{source} features of frame {int(np.argmin(norms))} are all zero, so their cosine "
                         f"similarity is undefined")
    unit = values / norms[:, None]
    return float(np.clip((unit[1:] * unit[:-1]).sum(axis=1).mean(), -1.0, 1.0))
