"""The one video reader: probe a file with PyAV and decode it on a constant frame-rate grid."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from show1.config import Size
from show1.data.errors import Rejected

THUMB = 32  # side of the gray thumbnails used for perceptual hashes and motion


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video. `width`/`height` are the size as displayed: a phone's portrait
    video is stored as landscape frames plus a display rotation, and `rotation` (0, 90, 180 or 270: degrees
    counter-clockwise, as PyAV's `VideoFrame.rotation`) says how to turn the decoded frames upright."""

    width: int
    height: int
    fps: float
    duration_s: float
    codec: str
    rotation: int = 0

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def coded_size(self) -> tuple[int, int]:
        """(width, height) of the decoded frames, before the display rotation."""
        return (self.height, self.width) if self.rotation % 180 else (self.width, self.height)


def quarter_turns(degrees: float) -> int:
    """A display rotation in degrees (counter-clockwise, any sign) rounded to the nearest quarter turn: 0-3."""
    return math.floor(degrees / 90 + 0.5) % 4


class VideoFile:
    """An open video: `info` from the container header, then `frames_on_grid` to decode it.

    Opening decodes nothing; `info` has the coded size and rotation 0 until `read_rotation` decodes the first
    frame (the display matrix is only exposed on decoded frames) and turns `info` into the displayed size.
    `threads` caps the decoder's threads (0: FFmpeg's choice); the frames are the same with any number.
    Use as a context manager; opening raises `Rejected` (empty_file, undecodable, no_video_stream).
    """

    def __init__(self, path: Path, threads: int = 0):
        self.path = Path(path)
        if self.path.stat().st_size == 0:
            raise Rejected("empty_file", f"{self.path} has zero bytes")
        try:
            self._container = av.open(str(self.path), mode="r")
        except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
            raise Rejected("undecodable", f"{self.path}: {exc}") from None
        self._rotation_read = False
        self._peeked: av.VideoFrame | None = None
        self._decoder: Iterator[av.VideoFrame] | None = None
        self._needed: frozenset[int] | None = None  # under a sampling plan: the packets whose frames are picked
        try:
            self._stream = self._video_stream()
            self.info = self._read_info()
            self._stream.thread_type = "AUTO"  # only settable before the decoder opens
            self._stream.codec_context.thread_count = threads  # 0: FFmpeg's choice, a thread per CPU + 1
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._container.close()

    def _video_stream(self) -> av.video.stream.VideoStream:
        if not self._container.streams.video:
            kinds = sorted({s.type for s in self._container.streams}) or ["none"]
            raise Rejected("no_video_stream", f"{self.path} has no video stream (streams: {', '.join(kinds)})")
        return self._container.streams.video[0]

    def _read_info(self) -> VideoInfo:
        stream, container = self._stream, self._container
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        elif stream.frames and fps:
            duration = stream.frames / fps
        else:
            duration = math.nan
        if not stream.width or not stream.height or stream.width < 0 or stream.height < 0:
            raise Rejected("undecodable", f"{self.path}: the video stream has no valid frame size "
                                          f"({stream.width}x{stream.height})")
        return VideoInfo(width=stream.width, height=stream.height, fps=fps, duration_s=duration,
                         codec=stream.codec_context.name)

    def read_rotation(self) -> VideoInfo:
        """Decode the first frame for its display matrix; set and return `info` with the displayed size.

        Call it only after the header passed its size limits: this is the first decode. The frame is kept
        for `frames_on_grid`, so nothing is decoded twice. Raises `Rejected` (undecodable) when no frame
        decodes."""
        if self._rotation_read:
            return self.info
        self._rotation_read = True
        self._decoder = self._decoded()
        try:
            self._peeked = next(self._decoder)
        except StopIteration:
            raise Rejected("undecodable", f"{self.path}: no frame could be decoded") from None
        except av.FFmpegError as exc:
            raise Rejected("undecodable", f"{self.path}: the first frame does not decode: {exc}") from None
        turns = quarter_turns(self._peeked.rotation)
        if turns:
            width, height = (self.info.height, self.info.width) if turns % 2 else (self.info.width, self.info.height)
            self.info = replace(self.info, width=width, height=height, rotation=90 * turns)
        return self.info

    def _decoded(self) -> Iterator[av.VideoFrame]:
        """Frames in presentation order from the demuxer's position. Under a sampling plan (`frames_on_grid`), a
        packet whose frame no grid time picks is decoded only if other frames refer to it (FFmpeg's NONREF)."""
        context = self._stream.codec_context
        for packet in self._container.demux(self._stream):
            if self._needed is not None:
                context.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in self._needed else "NONREF"
            yield from context.decode(packet)

    def _frames(self, seek: bool) -> Iterator[av.VideoFrame]:
        """Decoded frames in presentation order, starting with the one `read_rotation` decoded unless
        `seek` moved the demuxer since."""
        peeked, decoder, self._peeked, self._decoder = self._peeked, self._decoder, None, None
        if peeked is not None and decoder is not None and not seek:
            yield peeked
            yield from decoder
        else:
            yield from self._decoded()

    def _frame_rate(self) -> float:
        """The rate that stands in for missing presentation times and bounds the last frame's duration."""
        stream = self._stream
        return float(stream.average_rate or stream.guessed_rate or 25)

    def plan_grid(self, fps: float, start: float = 0.0, end: float | None = None) -> GridPlan | None:
        """What `frames_on_grid(fps, start, end)` will need, read from the packets' presentation times on a second
        handle to the file: demuxing only, no decoding (milliseconds, where decoding takes a tenth of a second or
        more). None when a packet has no presentation time or the demuxer fails: then everything is decoded."""
        time_base = self._stream.time_base
        if time_base is None or fps <= 0:
            return None
        stamps = []
        try:
            with av.open(str(self.path), mode="r") as container:
                for packet in container.demux(container.streams.video[0]):  # the stream `_video_stream` reads
                    if packet.size == 0:
                        continue  # the demuxer's flush packet
                    if packet.pts is None:
                        return None
                    stamps.append(packet.pts)
        except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError):
            return None
        if not stamps:
            return None
        stamps = sorted(set(stamps))
        # As PyAV computes `VideoFrame.time`, so that the same frames are picked.
        times = [float(pts) * time_base.numerator / time_base.denominator for pts in stamps]
        rate = self._frame_rate()
        picked = frames_near_grid(times, fps, start, end, last_duration=1.0 / rate)
        # The grid over these times, a little longer (SLACK_S) so that no rounding makes it shorter than the decode's.
        later_end = None if end is None else end + SLACK_S
        most = sum(1 for _ in on_grid(((t, None) for t in times), fps, start, later_end, None,
                                      last_duration=1.0 / rate + 2 * SLACK_S))
        return GridPlan(most=most, stamps=frozenset(stamps), needed=frozenset(stamps[i] for i in picked))

    def frames_on_grid(self, fps: float, start: float = 0.0, end: float | None = None,
                       max_frames: int | None = None, plan: GridPlan | None = None,
                       ) -> Iterator[tuple[float, av.VideoFrame]]:
        """Yield `(grid_time, frame)` for grid times start, start + 1/fps, …: each the decoded frame
        nearest that time (frames repeat when the source is slower than `fps`). Works on variable frame
        rates because it uses presentation times, not frame counts; a frame whose time does not move
        forward is dropped. A damaged tail ends the video. The frames are as decoded: turn them upright
        with `info.rotation` (FrameConverter does).

        With `plan` (`plan_grid` of the same fps, start and end), frames that no grid time picks are not decoded
        where the codec allows it: frames no other frame refers to, such as the B-frames that most H.264 encoders
        put between references. The frames yielded are the same (a damaged frame left undecoded cannot end the video
        early, as it would when decoded). A decoded frame that the packets did not announce raises `PlanBroken`
        before it is yielded, and the caller decodes again without a plan."""
        stream, container, path = self._stream, self._container, self.path
        seek = start > 0 and stream.time_base is not None
        if seek:
            try:
                container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
            except av.FFmpegError as exc:
                raise Rejected("undecodable", f"{path}: cannot seek to {start}s: {exc}") from None
        rate = self._frame_rate()
        self._needed = plan.needed if plan is not None else None
        decoded = 0
        failure: av.FFmpegError | None = None

        def timed() -> Iterator[tuple[float, av.VideoFrame]]:
            nonlocal decoded, failure
            previous_time = -math.inf
            try:
                for index, frame in enumerate(self._frames(seek)):
                    t = frame.time if frame.time is not None else index / rate
                    if plan is not None and (frame.pts not in plan.stamps or t <= previous_time):
                        raise PlanBroken(f"{path}: a decoded frame at pts {frame.pts} is not among the packets'")
                    previous_time = t
                    decoded += end is None or t < end  # a frame from the span: the video is not undecodable
                    yield t, frame
            except av.FFmpegError as exc:  # a damaged tail ends the video
                failure = exc

        yield from on_grid(timed(), fps, start, end, max_frames, last_duration=1.0 / rate)
        if decoded == 0:
            raise Rejected("undecodable", f"{path}: {failure}" if failure else f"{path}: no frame could be decoded")


class PlanBroken(RuntimeError):
    """The decoder produced a frame that the packets' presentation times did not announce (see `plan_grid`)."""


@dataclass(frozen=True)
class GridPlan:
    """From the packets of a file: `most` grid frames at most, the presentation times (`stamps`) of every frame,
    and those of the frames that a grid time may pick (`needed`)."""

    most: int
    stamps: frozenset[int]
    needed: frozenset[int]


T = TypeVar("T")


def on_grid(frames: Iterable[tuple[float, T]], fps: float, start: float, end: float | None,
            max_frames: int | None, last_duration: float) -> Iterator[tuple[float, T]]:
    """The grid sampling of `frames_on_grid` over `(time, frame)` pairs in presentation order: grid time g gets the
    frame nearest it (the midpoints between frames are the boundaries; the last frame lasts `last_duration / 2`
    past its time). Frames at or after `end` end it; a frame whose time does not move forward is dropped."""
    step = 1.0 / fps
    emitted = 0
    previous: tuple[float, T] | None = None
    for t, frame in frames:
        if end is not None and t >= end:
            break
        if previous is not None:
            if t <= previous[0]:
                continue
            midpoint = (previous[0] + t) / 2
            while (grid := start + emitted * step) < midpoint:
                yield grid, previous[1]
                emitted += 1
                if max_frames is not None and emitted >= max_frames:
                    return
        previous = (t, frame)
    if previous is None:
        return
    last_end = previous[0] + last_duration / 2
    if end is not None:
        last_end = min(last_end, end)
    while (grid := start + emitted * step) < last_end:
        yield grid, previous[1]
        emitted += 1
        if max_frames is not None and emitted >= max_frames:
            return


SLACK_S = 1e-6  # grid times this close to a boundary between two frames count for both


def frames_near_grid(times: list[float], fps: float, start: float, end: float | None,
                     last_duration: float) -> list[int]:
    """Indices of the frames (at increasing `times`) that `on_grid` may pick, and the first and last: each frame
    owns the times from the midpoint with the one before to the midpoint with the one after, and is kept when a
    grid time lies in that span give or take SLACK_S (so no float rounding can pick a frame left out)."""
    step = 1.0 / fps
    usable = [t for t in times if end is None or t < end]
    picked = []
    for i, t in enumerate(usable):
        low = (usable[i - 1] + t) / 2 - SLACK_S if i else -math.inf
        high = (t + usable[i + 1]) / 2 if i + 1 < len(usable) else t + last_duration / 2
        if end is not None:
            high = min(high, end)
        first = 0 if low == -math.inf else max(0, math.ceil((low - start) / step))
        while first > 0 and start + (first - 1) * step >= low:
            first -= 1
        if i in (0, len(usable) - 1) or start + first * step < high + SLACK_S:
            picked.append(i)
    return picked


def probe(path: Path, rotation: bool = True) -> VideoInfo:
    """Read the container header: size, frame rate, duration, codec; with `rotation`, also decode the
    first frame for its display rotation, so the size is the displayed one."""
    with VideoFile(path) as source:
        return source.read_rotation() if rotation else source.info


def cover_crop_box(src_w: int, src_h: int, size: Size) -> tuple[int, int, int, int]:
    """Scaled size (w, h) that covers `size` keeping the aspect, and the (left, top) of the centre crop."""
    scale = max(size.width / src_w, size.height / src_h)
    scaled_w = max(size.width, round(src_w * scale))
    scaled_h = max(size.height, round(src_h * scale))
    return scaled_w, scaled_h, (scaled_w - size.width) // 2, (scaled_h - size.height) // 2


class FrameConverter:
    """Turns decoded frames into upright, centre-cropped RGB images at every size, plus a gray thumbnail.

    `src_w` x `src_h` is the displayed size and `rotation` the display rotation (see `VideoInfo`). swscale scales
    the decoded frame straight to each size's cover size (area averaging down, bicubic up), and the thumbnail from
    its luma, in the frame's coded orientation; then `np.rot90` turns the image upright (counter-clockwise, as
    ffplay and browsers show them) and it is centre-cropped. One resampling of the source per size: measured on
    the demo sources, 1.5-1.9x as fast at the paper profile's three sizes as scaling once to the largest and
    resampling that image with PIL, and as fast or faster (up to 1.6x) at the tiny profile's two. Each size keeps
    its reformatter across frames: building a new scaler for every frame (what `VideoFrame.reformat` does) costs
    more than the scaling."""

    def __init__(self, src_w: int, src_h: int, sizes: list[Size], rotation: int = 0):
        self.sizes = list(sizes)
        self.boxes = {s.key: cover_crop_box(src_w, src_h, s) for s in self.sizes}
        self.upscale = {key: box[0] * box[1] > src_w * src_h for key, box in self.boxes.items()}
        self.turns = quarter_turns(rotation)
        self._scalers = {key: VideoReformatter() for key in [*self.boxes, "thumbnail"]}

    def _scaled(self, frame: av.VideoFrame, key: str, width: int, height: int, pixels: str,
                upscale: bool) -> np.ndarray:
        """`frame` scaled to width x height as displayed, turned upright."""
        coded_w, coded_h = (height, width) if self.turns % 2 else (width, height)
        image = self._scalers[key].reformat(frame, width=coded_w, height=coded_h, format=pixels,
                                            interpolation="BICUBIC" if upscale else "AREA").to_ndarray()
        return np.rot90(image, self.turns) if self.turns else image

    def __call__(self, frame: av.VideoFrame) -> tuple[dict[str, np.ndarray], np.ndarray]:
        out = {}
        for size in self.sizes:
            scaled_w, scaled_h, left, top = self.boxes[size.key]
            scaled = self._scaled(frame, size.key, scaled_w, scaled_h, "rgb24", self.upscale[size.key])
            out[size.key] = np.ascontiguousarray(scaled[top:top + size.height, left:left + size.width])
        thumbnail = np.ascontiguousarray(self._scaled(frame, "thumbnail", THUMB, THUMB, "gray", upscale=False))
        return out, thumbnail


def convert_all(frames: Iterable[av.VideoFrame], convert: FrameConverter,
                depth: int = 16) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """`convert` every frame on a second thread while the decoder produces the next ones.

    Decoding and swscale both release the GIL, so the two overlap (about the cost of decoding alone on
    two cores). A frame repeated back to back (a source slower than the grid) is converted once.
    """
    work: queue.Queue[av.VideoFrame | None] = queue.Queue(maxsize=depth)
    results: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
    failure: list[BaseException] = []

    def worker() -> None:
        last_frame, last = None, None
        while (frame := work.get()) is not None:
            if failure:
                continue  # drain after an error so the producer never blocks
            try:
                if frame is not last_frame:
                    last_frame, last = frame, convert(frame)
                assert last is not None
                results.append(last)
            except BaseException as exc:
                failure.append(exc)

    thread = threading.Thread(target=worker, name="show1-convert", daemon=True)
    thread.start()
    try:
        for frame in frames:
            if failure:
                break
            work.put(frame)
    finally:
        work.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return results


def to_uint8_frames(frames: Any) -> np.ndarray:
    """(F, 3, H, W) float in [-1, 1] (torch or numpy) or (F, H, W, 3) uint8 → (F, H, W, 3) uint8, C-contiguous
    (the same memory layout whether made here or received from another process: metrics computed on a strided
    view round differently, by ~1e-7)."""
    array = frames.detach().float().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if array.dtype == np.uint8 and array.shape[-1] == 3:
        return array
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"frames must be (frames, 3, height, width) in [-1, 1], got {array.shape}")
    return np.ascontiguousarray(((array.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1))


VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")


def write_video(frames: Any, path: Path | str, fps: float = 8.0) -> Path:
    """Write frames as .mp4 (H.264, yuv420p), .webm (VP9, plays in every browser) or .gif, atomically."""
    from show1 import atomic

    path = Path(path)
    images = to_uint8_frames(frames)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: write {', '.join(VIDEO_SUFFIXES)}")
    with atomic.atomic_path(path) as tmp:
        if suffix == ".gif":
            frames_pil = [Image.fromarray(image) for image in images]
            frames_pil[0].save(tmp, format="GIF", save_all=True, append_images=frames_pil[1:],
                               duration=round(1000 / fps), loop=0)
        else:
            # The same frames make the same bytes, on any machine. x264 runs on one thread: its bitstream depends on
            # its thread count, which follows the machine's cores (0.09 → 0.11 s for a 29×576×320 video). It runs
            # without macroblock-tree rate control: with it, the same frames gave other bytes in about 1 encode in 100
            # at 64×40 and 64×48, even in one process on a quiet machine; without it, none in 1,800. On two demo clips
            # at 29×576×320, crf 18: +5% and +70% bytes, for 0.14 dB less and 0.31 dB more PSNR.
            x264 = {"crf": "18", "threads": "1", "x264-params": "mbtree=0"}
            codec, options = ("libx264", x264) if suffix == ".mp4" else \
                ("libvpx-vp9", {"crf": "30", "b:v": "0", "deadline": "realtime", "cpu-used": "8"})
            height, width = images.shape[1:3]
            with av.open(str(tmp), mode="w", format=suffix[1:]) as container:
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
                stream.width, stream.height = width + width % 2, height + height % 2
                stream.pix_fmt = "yuv420p"
                stream.options = options
                for image in images:
                    if image.shape[:2] != (stream.height, stream.width):  # yuv420p needs even sizes
                        image = np.pad(image, ((0, stream.height - height), (0, stream.width - width), (0, 0)),
                                       mode="edge")
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
                container.mux(stream.encode())
    return path
