"""Score generated videos: the metrics whose models are available, and why the others were not computed.

Set-level: FID-vid (per-frame Fréchet distance on Inception features against the reference clips), FVD (I3D),
IS (a classifier), mean CLIPSIM and mean temporal consistency. Per prompt: CLIPSIM and temporal consistency.
Reference features are cached by content (data version, split, sampling, extractor file), so a nightly run
only pays for its own videos.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from show1 import atomic
from show1.config import Evaluate
from show1.evaluation import metrics
from show1.evaluation.features import (
    ClipModel,
    InceptionFeatures,
    MissingModelError,
    TorchScriptClassifier,
    TorchScriptVideoFeatures,
    packaged_inception_path,
)
from show1.evaluation.frechet import FeatureStats, frechet_distance
from show1.evaluation.reference import sample_frames
from show1.provenance import file_digest


@dataclass
class Scores:
    metrics: dict[str, float] = field(default_factory=dict)      # set-level
    per_prompt: list[dict[str, Any]] = field(default_factory=list)  # one dict of metrics per video
    skipped: dict[str, str] = field(default_factory=dict)       # metric -> why it was not computed


def _cached_features(cache: Path | None, key: dict[str, Any], compute: Callable[[], np.ndarray]) -> np.ndarray:
    if cache is None:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache / "eval-features" / f"{digest}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    features = compute()
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, features, allow_pickle=False)
    return features


def score(videos: list[np.ndarray], prompts: list[str], reference: list[np.ndarray], cfg: Evaluate,
          reference_key: dict[str, Any], cache: Path | None = None,
          on_status: Callable[[str], None] | None = None) -> Scores:
    """`videos` uint8 (F, H, W, 3), one per prompt; `reference_key` names the reference set for the cache."""
    say = on_status or (lambda _: None)
    scores = Scores(per_prompt=[{} for _ in videos])
    sampled = [sample_frames(v, cfg.frames_per_video) for v in videos]
    reference_sampled = [sample_frames(v, cfg.frames_per_video) for v in reference]

    try:
        inception_file = Path(cfg.inception) if cfg.inception else packaged_inception_path()
        inception = InceptionFeatures(inception_file, device=cfg.device)
    except MissingModelError as exc:
        for name in ("fid_vid", "temporal_consistency"):
            scores.skipped[name] = str(exc)
    else:
        say("Inception features of the generated frames")
        per_video = [inception(frames) for frames in sampled]
        for row, features in zip(scores.per_prompt, per_video, strict=True):
            row["temporal_consistency"] = metrics.consecutive_similarity(features)
        scores.metrics["temporal_consistency"] = float(np.mean([r["temporal_consistency"] for r in scores.per_prompt]))
        say("Inception features of the reference frames")
        reference_features = _cached_features(cache, reference_key | {
            "extractor": "inception", "file": file_digest(inception_file), "frames": cfg.frames_per_video},
            lambda: inception(metrics.frames_of(reference_sampled)))
        generated_features = np.concatenate(per_video)
        scores.metrics["fid_vid"] = frechet_distance(FeatureStats.from_features(generated_features),
                                                     FeatureStats.from_features(reference_features))

    if cfg.i3d is None:
        scores.skipped["fvd"] = "no I3D model configured (evaluate.i3d: a local TorchScript I3D file)"
    elif len(videos) < 2 or len(reference) < 2:
        scores.skipped["fvd"] = (f"FVD needs at least 2 videos per set (generated {len(videos)}, "
                                 f"reference {len(reference)})")
    else:
        say("I3D features (FVD)")
        i3d = TorchScriptVideoFeatures(cfg.i3d, device=cfg.device)
        reference_video_features = _cached_features(cache, reference_key | {
            "extractor": "i3d", "file": file_digest(Path(cfg.i3d))}, lambda: i3d(reference))
        scores.metrics["fvd"] = frechet_distance(FeatureStats.from_features(i3d(videos)),
                                                 FeatureStats.from_features(reference_video_features))

    if cfg.clip is None:
        scores.skipped["clipsim"] = "no CLIP model configured (evaluate.clip: a local transformers CLIP folder)"
    else:
        say("CLIP similarity")
        clip = ClipModel(cfg.clip, device=cfg.device)
        for row, frames, prompt in zip(scores.per_prompt, sampled, prompts, strict=True):
            row["clipsim"] = metrics.clipsim(frames, prompt, clip)
        scores.metrics["clipsim"] = float(np.mean([r["clipsim"] for r in scores.per_prompt]))

    if cfg.classifier is None:
        scores.skipped["inception_score"] = "no classifier configured (evaluate.classifier: a TorchScript file)"
    else:
        say("Inception Score")
        classifier = TorchScriptClassifier(cfg.classifier, device=cfg.device)
        mean, std = metrics.inception_score(metrics.frames_of(sampled), classifier)
        scores.metrics["inception_score"], scores.metrics["inception_score_std"] = mean, std
    return scores
