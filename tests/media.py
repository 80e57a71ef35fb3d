"""Real test media written with PyAV: moving, static and broken videos, audio-only files, manifests.

Everything is tiny (a few KB to a few tens of KB) and takes milliseconds to write, so tests can make
exactly the files they need in `tmp_path`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from typing import Any

import av
import numpy as np

Cell = str | bytes | int | float | None


def _even(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
    return width, height


def moving_frames(frames: int, fps: float, size: tuple[int, int], seed: int) -> Iterable[np.ndarray]:
    """RGB frames of a drifting colour grating plus a bright square on a seed-specific path.

    The grating's direction, frequency and colours come from the seed, so two seeds differ in their
    low spatial frequencies (what a perceptual hash sees), and the drift keeps every frame moving.
    """
    return moving_frames_at([index / fps for index in range(frames)], size, seed)


def moving_frames_at(times: Iterable[float], size: tuple[int, int], seed: int) -> Iterable[np.ndarray]:
    """`moving_frames` at explicit times in seconds (for variable frame rates)."""
    width, height = _even(size)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    cycles = rng.uniform(1.0, 2.5)
    kx, ky = (2 * np.pi * cycles * np.array([np.cos(angle), np.sin(angle)]) / max(width, height))
    # A second, perpendicular grating so no two seeds share a 1-D structure.
    angle2 = angle + np.pi / 2 + rng.uniform(-0.5, 0.5)
    cycles2 = rng.uniform(0.5, 1.5)
    kx2, ky2 = (2 * np.pi * cycles2 * np.array([np.cos(angle2), np.sin(angle2)]) / max(width, height))
    phases = rng.uniform(0, 2 * np.pi, size=3)
    speed = rng.uniform(1.5, 3.0) * rng.choice([-1, 1])  # radians per second
    side = max(6, min(width, height) // 4)
    cx0, cy0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    vx, vy = rng.uniform(20, 40, size=2) * rng.choice([-1, 1], size=2)  # pixels per second
    colour = rng.integers(0, 256, size=3)
    for t in times:
        wave = np.sin(kx * x + ky * y - speed * t)[..., None] + 0.6 * np.sin((kx2 * x + ky2 * y)[..., None] + phases)
        image = np.clip(128 + 70 * wave, 0, 255).astype(np.uint8)
        # The square bounces inside the frame.
        left = int(abs((cx0 + vx * t) % (2 * (width - side)) - (width - side)))
        top = int(abs((cy0 + vy * t) % (2 * (height - side)) - (height - side)))
        image[top:top + side, left:left + side] = colour
        yield image


def _encode(path: Path, images: Iterable[np.ndarray], fps: float, size: tuple[int, int],
            codec: str = "libx264", crf: int = 23, faststart: bool = False, container_format: str | None = None,
            rotation: int = 0, bframes: int = 0) -> Path:
    """Encode RGB images; `container_format` overrides the one the file name implies, `rotation` writes a
    display matrix (degrees counter-clockwise, as PyAV's `VideoFrame.rotation` reads it back). `bframes`: x264
    puts up to this many B-frames between references, none of them referenced (as camera and stock footage often
    has); 0: none (zero latency)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = _even(size)
    rate = Fraction(fps).limit_denominator(1001)
    # faststart puts the index (moov) first, so a truncated copy still opens and decodes up to the cut.
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format=container_format, options=options) as container:
        if codec == "libx264":
            delay = {"x264-params": f"bframes={bframes}:b-pyramid=none"} if bframes else {"tune": "zerolatency"}
            stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": "veryfast"} | delay)
        elif codec == "libvpx-vp9":
            stream = container.add_stream(codec, rate=rate, options={
                "crf": str(crf), "b:v": "0", "deadline": "realtime", "cpu-used": "8"})
        else:
            stream = container.add_stream(codec, rate=rate)
            # No CRF in mpeg4: a higher `crf` means a lower bit rate, as with x264.
            stream.bit_rate = max(20_000, 400_000 >> max(0, crf // 6))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for image in images:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if (frame.width, frame.height) != (width, height):
                frame = frame.reformat(width=width, height=height)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_video(path: Path | str, frames: int = 48, fps: float = 24, size: tuple[int, int] = (96, 64),
                pattern: str = "moving", seed: int = 0, codec: str = "libx264", crf: int = 23,
                faststart: bool = False, bframes: int = 0) -> Path:
    """Write an h264 (or mpeg4) yuv420p mp4; `pattern` is "moving" or "static"; `bframes` as `_encode`.

    Without `faststart` the mp4 index comes last, as ffmpeg writes it by default.
    """
    if pattern == "moving":
        images = moving_frames(frames, fps, size, seed)
    elif pattern == "static":
        still = next(iter(moving_frames(1, fps, size, seed)))
        images = (still for _ in range(frames))
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return _encode(Path(path), images, fps, size, codec=codec, crf=crf, faststart=faststart, bframes=bframes)


def write_static_video(path: Path | str, frames: int = 48, fps: float = 24,
                       size: tuple[int, int] = (96, 64), seed: int = 0) -> Path:
    """The same still image in every frame."""
    return write_video(path, frames=frames, fps=fps, size=size, pattern="static", seed=seed)


def write_one_frame_video(path: Path | str, fps: float = 24, size: tuple[int, int] = (96, 64),
                          seed: int = 0) -> Path:
    return write_video(path, frames=1, fps=fps, size=size, seed=seed)


def write_webm_video(path: Path | str, frames: int = 48, fps: float = 24, size: tuple[int, int] = (96, 64),
                     seed: int = 0) -> Path:
    """A VP9 WebM of moving frames, whatever the file is named (e.g. a WebM saved as .mp4)."""
    return _encode(Path(path), moving_frames(frames, fps, size, seed), fps, size, codec="libvpx-vp9", crf=30,
                   container_format="webm")


def quadrant_frames(frames: int, fps: float, size: tuple[int, int], seed: int = 0) -> Iterable[np.ndarray]:
    """A bright (230) top-left quadrant over a dark drifting grating (20-80) elsewhere.

    The grating keeps every frame moving; the quadrant shows which way a frame is turned.
    """
    width, height = _even(size)
    for image in moving_frames(frames, fps, size, seed):
        dark = (20 + image.astype(np.float32) * (60 / 255)).astype(np.uint8)
        dark[:height // 2, :width // 2] = 230
        yield dark


def write_rotated_video(path: Path | str, degrees: int, frames: int = 48, fps: float = 24,
                        size: tuple[int, int] = (96, 64), seed: int = 0) -> Path:
    """`quadrant_frames` stored as coded, with a display rotation of `degrees` counter-clockwise.

    What a phone writes for a portrait video: landscape frames plus a display matrix. A player shows
    np.rot90(frame, degrees // 90); ffmpeg's `-display_rotation DEGREES` writes the same matrix.
    """
    return _encode(Path(path), quadrant_frames(frames, fps, size, seed), fps, size, rotation=degrees)


def vfr_level(index: int) -> int:
    """The gray level of the top band of frame `index` of `write_vfr_video` (distinct per frame)."""
    return 16 + (9 * index) % 224


def write_vfr_video(path: Path | str, timestamps: Sequence[float], size: tuple[int, int] = (96, 64),
                    seed: int = 0) -> Path:
    """An h264 mp4 whose frames are presented at `timestamps` (seconds, increasing, irregular).

    Frame i is `moving_frames` at its own time with a top band (a quarter of the height) at gray level
    `vfr_level(i)`, so every frame can be told apart. Times are stored in milliseconds (time base 1/1000).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = _even(size)
    times = list(timestamps)
    millis = [round(t * 1000) for t in times]
    if not millis or millis[0] < 0 or any(b <= a for a, b in pairwise(millis)):
        raise ValueError(f"{path}: timestamps must increase by at least 1 ms from >= 0, got {times}")
    time_base = Fraction(1, 1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", options={"crf": "20", "preset": "veryfast", "tune": "zerolatency"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base
        for index, image in enumerate(moving_frames_at(times, size, seed)):
            image[:height // 4] = vfr_level(index)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = millis[index], time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_enormous_video(path: Path | str, size: tuple[int, int] = (8192, 4352), frames: int = 2,
                         faststart: bool = False) -> Path:
    """A real h264 mp4 of flat gray frames at an enormous size (a decompression bomb's header).

    x264 ultrafast codes flat frames in about a second and ~100 KB; only the header is meant to be read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = _even(size)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream("libx264", rate=24, options={"preset": "ultrafast", "tune": "zerolatency"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frame = av.VideoFrame(width, height, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes([128]) * plane.buffer_size)
        for index in range(frames):
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_audio_only(path: Path | str, seconds: float = 1.0, rate: int = 22050) -> Path:
    """An mp4/m4a holding only an AAC audio stream (a 440 Hz tone)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        step = stream.codec_context.frame_size or 1024
        total = int(seconds * rate)
        for first in range(0, total, step):
            t = (first + np.arange(step)) / rate
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, first
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def truncate(path: Path | str, out: Path | str, fraction: float = 0.5) -> Path:
    """Copy the first `fraction` of `path`'s bytes (a download cut off half way)."""
    data = Path(path).read_bytes()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data[:int(len(data) * fraction)])
    return out


def write_zero_byte(path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_text_as_mp4(path: Path | str) -> Path:
    """A text file with a video's name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("This is not a video, it only has a video's name.\n" * 20, encoding="utf-8")
    return path


def reencode(path: Path | str, out: Path | str, crf: int = 35, size: tuple[int, int] | None = None,
             codec: str = "libx264") -> Path:
    """A near-duplicate: the same frames at the same rate, re-encoded at another quality (and size)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 24)
        images = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    height, width = images[0].shape[:2]
    return _encode(Path(out), images, fps, size or (width, height), codec=codec, crf=crf)


def _csv_cell(value: Cell) -> bytes:
    if value is None:
        return b""
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return b'"' + raw.replace(b'"', b'""') + b'"'


def write_manifest_csv(path: Path | str, rows: Sequence[Mapping[str, Cell]],
                       columns: Sequence[str] | None = None) -> Path:
    """Write a CSV manifest; every cell is quoted, `bytes` cells go in raw (for binary captions).

    `columns` defaults to the keys of all rows in first-seen order; a row lacking a key gets an empty cell.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [b",".join(name.encode() for name in columns)]
    lines += [b",".join(_csv_cell(row.get(name)) for name in columns) for row in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def write_manifest_jsonl(path: Path | str, rows: Sequence[Mapping[str, Any] | str]) -> Path:
    """Write a JSONL manifest; a `str` row is written verbatim (to make a malformed line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(dict(row)) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
