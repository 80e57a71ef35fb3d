"""One manifest row → its source, checked and decoded: the header filters (size, rate, aspect, duration) before any
frame is decoded, then the frames on the clip grid at every size, the motion and near-duplicate hashes. Anything
unusable raises `Rejected` with a stable reason (show1/data/errors.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from show1.config import Clip, Curate
from show1.data import captions, quality, sources, video
from show1.data.errors import Rejected
from show1.data.manifest import ManifestRow
from show1.provenance import file_digest

_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class KeptSource:
    """A source that passed every per-row filter, with its sampled frames at every size."""

    row: ManifestRow
    source_id: str
    caption: str
    path: Path
    source_hash: str
    info: video.VideoInfo
    span: tuple[float, float]
    frames: dict[str, np.ndarray]
    firsts: list[int]
    hashes: np.ndarray
    motion: float


def _safe_id(text: str) -> str:
    """Letters, digits, `_`, `-` and `.` only, never starting with a dot (no `..`, no hidden-file names)."""
    return re.sub(r"^\.+", lambda m: "_" * len(m.group()), _ID_CHARS.sub("_", text))


def source_id_for(row: ManifestRow) -> str:
    if row.id:
        return _safe_id(row.id)
    stem = _safe_id(Path(str(row.video).split("?")[0]).stem) or "video"
    return f"{stem}-r{row.row}"


def _fits(width: int, height: int, cfg: Curate) -> bool:
    return width <= cfg.filters.max_width and height <= cfg.filters.max_height


def _check_coded_size(info: video.VideoInfo, cfg: Curate, path: Path) -> None:
    """The decompression-bomb guard, before any frame is decoded: the header's coded size must fit
    max_width x max_height in some orientation (the display rotation is known only after the first decode;
    `_check_header` then checks the displayed size exactly)."""
    f = cfg.filters
    if not (_fits(info.width, info.height, cfg) or _fits(info.height, info.width, cfg)):
        raise Rejected("resolution_too_large", f"{path}: {info.width}x{info.height} frames are larger than "
                                               f"max_width x max_height {f.max_width}x{f.max_height}")


def _check_header(info: video.VideoInfo, cfg: Curate, start: float, end: float | None,
                  path: Path | None = None) -> float:
    """Apply the header-level filters to the displayed size; return the usable duration in seconds."""
    f = cfg.filters
    if not _fits(info.width, info.height, cfg):
        turned = f" (as displayed, rotated {info.rotation} degrees)" if info.rotation else ""
        raise Rejected("resolution_too_large", f"{path or 'the video'}: {info.width}x{info.height}{turned} is "
                                               f"larger than max_width x max_height {f.max_width}x{f.max_height}")
    if not f.min_fps <= info.fps <= f.max_fps:
        raise Rejected("bad_fps", f"{info.fps:.2f} fps is outside [{f.min_fps}, {f.max_fps}]")
    if info.width < f.min_width or info.height < f.min_height:
        raise Rejected("too_small", f"{info.width}x{info.height} is below {f.min_width}x{f.min_height}")
    if not f.min_aspect <= info.aspect <= f.max_aspect:
        raise Rejected("bad_aspect", f"aspect {info.aspect:.2f} ({info.width}x{info.height}) is outside "
                                     f"[{f.min_aspect}, {f.max_aspect}]")
    if np.isnan(info.duration_s):
        return float("nan")
    if start >= info.duration_s:
        raise Rejected("bad_time_span", f"start {start}s is past the end of the {info.duration_s:.2f}s video")
    usable = min(end if end is not None else info.duration_s, info.duration_s) - start
    if usable > f.max_duration_s:
        raise Rejected("too_long", f"{usable:.1f}s > max_duration_s {f.max_duration_s}")
    if usable < f.min_duration_s:
        raise Rejected("too_short", f"{usable:.2f}s < min_duration_s {f.min_duration_s}")
    return usable


def _locate(row: ManifestRow, manifest_dir: Path, cfg: Curate, cache: Path) -> Path:
    assert row.video is not None
    sources.check_scheme(row.video)
    if sources.is_url(row.video):
        return sources.download(row.video, cache, cfg.download)
    return sources.resolve_local(row.video, manifest_dir, cfg.allowed_roots, cfg.allowed_packages)


def _frames_clips_can_use(clip: Clip, grid_frames: int | None) -> int | None:
    """How many grid frames to decode: the frames of the most clips that `grid_frames` (at least the source's grid
    frames; None: unknown) and `clip.max_per_source` allow. The tail after the last clip is left undecoded: about a
    quarter of a 5 s source at the default 29 frames every 29. None: decode to the end."""
    most = clip.max_per_source or None
    if grid_frames is not None and grid_frames >= clip.frames:
        fitting = (grid_frames - clip.frames) // clip.stride + 1
        most = fitting if most is None else min(most, fitting)
    return None if most is None else clip.frames + (most - 1) * clip.stride


def _sample(path: Path, row: ManifestRow, start: float, cfg: Curate, threads: int,
            planned: bool) -> tuple[video.VideoInfo, list[tuple[dict[str, np.ndarray], np.ndarray]]]:
    """The source's header checks, then its frames on the clip grid at every size (and thumbnails). `planned`: from
    the packets' times (`VideoFile.plan_grid`), decode nothing after the last clip that fits and leave out the
    non-reference frames that no grid time picks."""
    with video.VideoFile(path, threads=threads) as source:
        _check_coded_size(source.info, cfg, path)  # before the first decode
        info = source.read_rotation()
        _check_header(info, cfg, start, row.end, path)
        clip = cfg.clip
        plan = source.plan_grid(clip.fps, start=start, end=row.end) if planned else None
        limit = _frames_clips_can_use(clip, plan.most if plan else None)
        frames = (frame for _, frame in source.frames_on_grid(clip.fps, start=start, end=row.end, max_frames=limit,
                                                                plan=plan))
        converter = video.FrameConverter(info.width, info.height, clip.sizes, rotation=info.rotation)
        try:
            return info, video.convert_all(frames, converter)
        except av.FFmpegError as exc:  # swscale cannot convert what the decoder produced
            raise Rejected("undecodable", f"{path}: a decoded frame cannot be converted to RGB: {exc}") from None


def process_row(row: ManifestRow, manifest_dir: Path, cfg: Curate, cache: Path,
                source_id: str | None = None, threads: int = 0) -> KeptSource:
    """Run every per-row check and decode the source (on `threads` decoding threads, 0: FFmpeg's choice); raise
    `Rejected` for anything unusable."""
    if row.rejection is not None:
        raise row.rejection
    if not row.video:
        raise Rejected("missing_video", "the row has no video path or URL")
    caption = captions.check_caption(row.caption, cfg.caption)
    path = _locate(row, manifest_dir, cfg, cache)
    size = path.stat().st_size
    if size > cfg.filters.max_source_bytes:
        raise Rejected("too_large", f"{size} bytes > curate.filters.max_source_bytes {cfg.filters.max_source_bytes}")
    start = row.start or 0.0
    try:
        info, converted = _sample(path, row, start, cfg, threads, planned=True)
    except video.PlanBroken:  # a frame its packets did not announce: decode every frame, the way it always works
        info, converted = _sample(path, row, start, cfg, threads, planned=False)
    clip = cfg.clip
    sampled = len(converted)
    if sampled < clip.frames:
        raise Rejected("too_short", f"{sampled} frames at {clip.fps:g} fps; a clip needs {clip.frames}")
    firsts = list(range(0, sampled - clip.frames + 1, clip.stride))
    if clip.max_per_source:
        firsts = firsts[:clip.max_per_source]
    used = firsts[-1] + clip.frames
    thumbnails = np.stack([thumb for _, thumb in converted[:used]])
    motion = quality.mean_motion(thumbnails)  # over the frames the clips use: the tail after them is not decoded
    if motion < cfg.filters.static_threshold:
        raise Rejected("static", f"mean frame difference {motion:.3f} < static_threshold "
                                 f"{cfg.filters.static_threshold}")
    picks = quality.pick_evenly(used, cfg.filters.dedup_frames)
    hashes = np.array([quality.phash(thumbnails[i]) for i in picks], dtype=np.uint64)
    return KeptSource(
        row=row, source_id=source_id or source_id_for(row), caption=caption, path=path,
        source_hash=file_digest(path), info=info, span=(start, start + used / clip.fps),
        frames={s.key: np.stack([images[s.key] for images, _ in converted[:used]]) for s in clip.sizes},
        firsts=firsts,
        hashes=hashes, motion=motion)
