"""Reference clips for the distribution metrics: a curated split, at the largest size it was curated at."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from show1.config import Size
from show1.data.clip_index import INDEX_PARQUET, curated_sizes
from show1.data.dataset import CuratedClips
from show1.evaluation.features import sample_indices


def sample_frames(video: np.ndarray, count: int) -> np.ndarray:
    """`count` frames evenly spread over the video (all of them when it is shorter)."""
    return video if count >= len(video) else video[sample_indices(len(video), count)]


def reference_videos(curated: Path, split: str, max_clips: int) -> tuple[list[np.ndarray], str]:
    """Up to `max_clips` clips of `split` (spread evenly over the split) as uint8 (F, H, W, 3); and the size."""
    try:
        resolutions = curated_sizes(curated)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (no curated clips to compare with)") from None
    if not resolutions:
        raise FileNotFoundError(f"{Path(curated) / INDEX_PARQUET}: no curated clips to compare with (run show1 curate)")
    sizes = sorted((Size.model_validate(key) for key in resolutions), key=lambda s: s.width * s.height)
    clips = CuratedClips(curated, size=sizes[-1], split=split, normalize=False)
    if not clips:
        raise ValueError(f"{curated}: the {split} split has no clips to compare with (curate more data, or "
                         "evaluate against the other split)")
    picks = np.unique(np.linspace(0, len(clips) - 1, min(max_clips, len(clips))).round().astype(int))
    videos = [clips[int(i)]["frames"].permute(0, 2, 3, 1).numpy() for i in picks]
    return videos, sizes[-1].key
