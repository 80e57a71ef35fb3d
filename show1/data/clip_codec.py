"""A curated source's frames at one size, encoded: what a shard stores and what training decodes.

A source's sampled frames at one size are encoded as one small MP4 (H.264 by default) with a keyframe at the
first frame of every clip, so a clip is decoded from its own first frame: no frame before it is decoded, and the
clips of a source (which overlap when `curate.clip.stride` < `curate.clip.frames`) share their frames instead of
storing them again. The bytes are the same on any machine for the same frames and settings: x264 runs on one thread
without macroblock-tree rate control (see `show1.data.video.write_video`), the muxer writes no version string.

Measured on the demo's three sources at the paper profile (29 frames at 576x320, 256x160 and 64x40 per clip; raw
uint8 frames were 19.8 MB per clip):

    libx264 yuv444p crf 18 (default)   0.45 MB per clip, mean PSNR 41.4 / 39.0 / 38.6 dB (576x320 / 256x160 / 64x40)
    libx264 yuv420p crf 18             0.44 MB per clip, 39.8 / 37.7 / 34.0 dB (chroma at half size hurts small frames)
    libx264rgb rgb24 crf 0 (lossless)  6.8 MB per clip, the raw frames bit for bit

`benchmarks/bench_dataloader.py` measures the decode rate.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

from show1.config import Encoding

# The muxer's own version string and creation time stay out of the file: the same frames make the same bytes.
_BITEXACT = {"fflags": "+bitexact"}
_STREAM_BITEXACT = {"flags": "+bitexact"}


class DecodeError(ValueError):
    """Stored frames that cannot be decoded: a damaged shard."""


def encode_frames(frames: np.ndarray, encoding: Encoding, keyframes: list[int], fps: float = 7.5) -> bytes:
    """Encode `frames` (N, H, W, 3) uint8 as one MP4, with a keyframe (IDR) at each index of `keyframes`."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (frames, height, width, 3) uint8, got {frames.shape} {frames.dtype}")
    count, height, width = frames.shape[:3]
    if encoding.pixel_format == "yuv420p" and (height % 2 or width % 2):
        raise ValueError(f"{width}x{height}: yuv420p needs even sizes; use pixel_format yuv444p")
    starts = set(keyframes)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options=_BITEXACT) as container:
        stream = container.add_stream(encoding.codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, encoding.pixel_format
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        # forced-idr: a keyframe asked for is an IDR frame, so nothing after it refers to a frame before it.
        stream.options = {"crf": str(encoding.crf), "threads": "1", "x264-params": "mbtree=0:forced-idr=1",
                          "preset": encoding.preset} | ({"tune": encoding.tune} if encoding.tune != "none" else {})
        for number in range(count):
            frame = av.VideoFrame.from_ndarray(frames[number], format="rgb24")
            frame.pts = number
            if number in starts:
                frame.pict_type = av.video.frame.PictureType.I
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def decode_frames(data: bytes | memoryview, first: int = 0, count: int | None = None) -> np.ndarray:
    """Frames `first … first+count-1` (None: to the end) of an `encode_frames` stream as (count, H, W, 3) uint8,
    decoded from the keyframe at or before `first` (one is stored at every clip's first frame)."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            # One thread: a clip's frames in order, on the caller's thread (its shards have one slice per frame, so
            # FFmpeg's threads would add nothing but threads inside training processes that run their own).
            stream.thread_type = "SLICE"
            stream.codec_context.thread_count = 1
            rate = stream.average_rate or stream.guessed_rate
            if first:
                container.seek(int(first / rate / stream.time_base), stream=stream, backward=True)
            frames = []
            for frame in container.decode(stream):
                number = round(frame.pts * stream.time_base * rate)
                if number < first:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == count:
                    break
    except (av.FFmpegError, IndexError, ZeroDivisionError, TypeError) as exc:
        raise DecodeError(f"stored frames cannot be decoded ({exc})") from None
    if count is None:
        if not frames:
            raise DecodeError(f"stored frames end before frame {first}")
        return np.stack(frames)
    if len(frames) != count:
        raise DecodeError(f"stored frames end after {first + len(frames)} frames; the clip needs frames "
                          f"{first}-{first + count - 1}")
    return np.stack(frames)
