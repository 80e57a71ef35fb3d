"""Curation of a hostile corpus, run once through the real CLI: broken, renamed, enormous, rotated and
variable-frame-rate videos, hostile captions and paths. Every row must end up in exactly one of index.jsonl
(with all its clips) or quarantine.jsonl (with its stable reason), and the run must not crash.

Everything is generated in a temporary folder in a couple of seconds; nothing is committed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import imageio_ffmpeg
import media
import numpy as np
import pytest
from conftest import CLIPS_PER_GOOD_VIDEO, REPO

from show1.config import Params, Size
from show1.data import video
from show1.data.errors import REASONS, Rejected
from show1.data.shards import ShardReader, verify_shard

CLIP_FPS = 8  # conftest.SMALL: 8-frame clips at 8 fps, sizes 32x20 and 64x40
# Irregular presentation times (s): bursts (frames the 8 fps grid skips) and gaps (frames it repeats).
VFR_TIMES = [0.0, 0.04, 0.09, 0.3, 0.33, 0.36, 0.62, 0.7, 0.95, 1.0, 1.05, 1.1, 1.42, 1.47, 1.8, 1.83, 2.05, 2.22]
HTML_CAPTION = '<p>Bars <b>slide</b> &amp; a square&nbsp;bounces <a href="https://x.org/v">here</a></p>'
HTML_CLEANED = "Bars slide & a square bounces here"
BINARY_CAPTION = b"\x00\x01\xfe\xff\x02\x03binary\x80\x81\x90\x04"
LONG_CAPTION = ("a hostile caption " * 600)[:10_000]


@dataclass(frozen=True)
class Row:
    label: str
    video: str
    caption: str | bytes
    expect: str | None = None  # the quarantine reason; None: kept
    clips: int = CLIPS_PER_GOOD_VIDEO
    id: str | None = None


def _manifest_rows() -> list[Row]:
    ok = "A moving pattern, nothing more."
    return [
        Row("good0", "videos/good0.mp4", "A red square over drifting stripes.", id="dup"),
        Row("good1", "videos/good1.mp4", "Green waves roll to the right."),
        Row("good2", "videos/good2.mp4", "Blue bars slide slowly upwards."),
        Row("good3", "videos/good3.mp4", "Stripes turn while a square bounces."),
        Row("html_caption", "videos/good4.mp4", HTML_CAPTION),
        Row("mp4_as_avi", "videos/renamed.avi", "An mp4 saved with an .avi name."),
        Row("mp4_no_extension", "videos/no_extension", "An mp4 saved without an extension."),
        Row("webm_as_mp4", "videos/webm.mp4", "A VP9 WebM saved with an .mp4 name."),
        Row("vfr", "videos/vfr.mp4", "Frames at irregular times."),
        Row("rotated90", "videos/rotated90.mp4", "A portrait phone video, rotated 90 degrees."),
        Row("rotated270", "videos/rotated270.mp4", "A portrait phone video, rotated 270 degrees."),
        Row("truncated", "videos/truncated.mp4", ok, "undecodable"),
        Row("zero_byte", "videos/zero_byte.mp4", ok, "empty_file"),
        Row("text_as_mp4", "videos/text.mp4", ok, "undecodable"),
        Row("audio_only", "videos/audio_only.m4a", ok, "no_video_stream"),
        Row("one_frame", "videos/one_frame.mp4", ok, "too_short"),
        Row("enormous", "videos/enormous.mp4", ok, "resolution_too_large"),
        Row("enormous_header_only", "videos/enormous_header_only.mp4", ok, "resolution_too_large"),
        Row("empty_caption", "videos/good5.mp4", "", "empty_caption"),
        Row("whitespace_caption", "videos/good5.mp4", " \t  ", "empty_caption"),
        Row("binary_caption", "videos/good5.mp4", BINARY_CAPTION, "binary_caption"),
        Row("long_caption", "videos/good5.mp4", LONG_CAPTION, "caption_too_long"),
        Row("duplicate_id", "videos/good5.mp4", ok, "duplicate_id", id="dup"),
        Row("dotdot", "../x.mp4", ok, "path_outside_root"),
        Row("absolute", "/etc/passwd", ok, "path_outside_root"),
        Row("home", "~/x.mp4", ok, "path_outside_root"),
        Row("symlink_out", "videos/link.mp4", ok, "path_outside_root"),
        Row("file_url", "file:///etc/passwd", ok, "unsupported_scheme"),
        Row("package_dotdot", "package://av/../../../../../../../etc/passwd", ok, "path_outside_root"),
        Row("package_absolute", "package://av//etc/passwd", ok, "path_outside_root"),
        Row("package_not_allowed", "package://numpy/../x.mp4", ok, "path_outside_root"),
    ]


ROWS = _manifest_rows()
BAD = {r.label: r.expect for r in ROWS if r.expect}
GOOD = [r.label for r in ROWS if not r.expect]


def header_only(path: Path, out: Path) -> Path:
    """Copy a faststart mp4 up to its media data (mdat): the header (moov) is whole, no frame is left."""
    data = path.read_bytes()
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"mdat":
            break
        if size < 8:
            raise ValueError(f"{path}: unexpected box size {size} at byte {offset}")
        offset += size
    else:
        raise ValueError(f"{path}: no mdat box")
    out.write_bytes(data[:offset])
    return out


def write_corpus(root: Path) -> float:
    """Write every video of the corpus under root/videos; return the seconds it took."""
    started = time.perf_counter()
    videos = root / "videos"
    for seed in range(6):
        media.write_video(videos / f"good{seed}.mp4", seed=seed)
    # PyAV picks the container from the name: write real mp4s, then rename them.
    media.write_video(videos / "renamed.mp4", seed=6).rename(videos / "renamed.avi")
    media.write_video(videos / "no_extension.mp4", seed=8).rename(videos / "no_extension")
    media.write_webm_video(videos / "webm.mp4", seed=7)
    media.write_vfr_video(videos / "vfr.mp4", VFR_TIMES, seed=30)
    media.write_rotated_video(videos / "rotated90.mp4", 90, seed=21)
    media.write_rotated_video(videos / "rotated270.mp4", 270, seed=22)
    media.truncate(videos / "good0.mp4", videos / "truncated.mp4", 0.5)
    media.write_zero_byte(videos / "zero_byte.mp4")
    media.write_text_as_mp4(videos / "text.mp4")
    media.write_audio_only(videos / "audio_only.m4a")
    media.write_one_frame_video(videos / "one_frame.mp4", seed=9)
    media.write_enormous_video(videos / "enormous.mp4", faststart=True)
    with av.open(str(videos / "enormous.mp4")) as container:  # a real file, not a patched header
        assert container.format.name.startswith("mov"), container.format.name
    # The same header with every frame cut off: only a check that reads no frame can reject it by its size.
    header_only(videos / "enormous.mp4", videos / "enormous_header_only.mp4")
    shutil.copyfile(videos / "good5.mp4", root.parent / "x.mp4")  # exists, outside the root
    (videos / "link.mp4").symlink_to(root.parent / "x.mp4")
    return time.perf_counter() - started


@dataclass
class Corpus:
    root: Path
    out: Path
    params: Params
    output: str
    returncode: int
    index: list[dict[str, Any]]
    quarantine: list[dict[str, Any]]
    sources: dict[int, dict[str, Any]]  # row -> source record of the part files
    timings: dict[str, float]

    def row(self, label: str) -> int:
        return next(i for i, r in enumerate(ROWS) if r.label == label)

    def clips(self, label: str) -> list[dict[str, Any]]:
        return [c for c in self.index if c["row"] == self.row(label)]

    def frames(self, label: str, size: str = "64x40") -> np.ndarray:
        """The curated frames of a kept row at one size, as stored in its shard."""
        clip = self.clips(label)[0]
        return ShardReader(self.out).frames(clip["shard"], f"{clip['tensor']}/{size}", 0, None)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, write_params: Callable[..., Params]) -> Corpus:
    base = tmp_path_factory.mktemp("hostile")
    root = base / "root"
    generate_s = write_corpus(root)
    manifest = media.write_manifest_csv(root / "manifest.csv", [
        {"id": r.id, "video": r.video, "caption": r.caption} for r in ROWS], columns=["id", "video", "caption"])
    params = write_params(base, {"curate": {"allowed_packages": ["av"]}})
    out = base / "out"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{base / 'mlflow.db'}")
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "show1.cli", "--params", str(base / "params.yaml"), "curate", str(manifest),
         "--out", str(out), "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    curate_s = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    sources = {s["row"]: s for part in sorted((out / "parts").glob("part-*.json"))
               for s in json.loads(part.read_text())["sources"]}
    return Corpus(root=root, out=out, params=params, output=output, returncode=result.returncode,
                  index=read_jsonl(out / "index.jsonl"), quarantine=read_jsonl(out / "quarantine.jsonl"),
                  sources=sources, timings={"generate_s": generate_s, "curate_cli_s": curate_s})


# ------------------------------------------------------------------------------------------ the run


def test_cli_curates_the_hostile_corpus_without_crashing(corpus: Corpus) -> None:
    assert corpus.returncode == 0
    assert "Traceback" not in corpus.output
    assert "curation summary" in corpus.output
    summary = json.loads((corpus.out / "summary.json").read_text())
    assert summary["rows"] == len(ROWS)
    assert summary["kept_sources"] == len(GOOD)
    assert summary["rejected_rows"] == len(BAD)


def test_corpus_covers_the_hostile_cases() -> None:
    assert set(BAD.values()) <= set(REASONS)
    assert "resolution_too_large" in REASONS
    assert len(set(BAD.values())) >= 10


@pytest.mark.parametrize("label", list(BAD))
def test_bad_row_is_quarantined_once_with_its_reason(corpus: Corpus, label: str) -> None:
    row = corpus.row(label)
    entries = [q for q in corpus.quarantine if q["row"] == row]
    assert len(entries) == 1, entries
    assert entries[0]["reason"] == BAD[label], entries[0]
    assert entries[0]["error"]
    assert entries[0]["video"] == ROWS[row].video
    assert not corpus.clips(label)


@pytest.mark.parametrize("label", GOOD)
def test_good_row_is_kept_with_all_its_clips(corpus: Corpus, label: str) -> None:
    clips = corpus.clips(label)
    rejected = [q for q in corpus.quarantine if q["row"] == corpus.row(label)]
    assert len(clips) == ROWS[corpus.row(label)].clips, rejected
    assert {c["source"] for c in clips} == {ROWS[corpus.row(label)].video}
    assert [c["frame_start"] for c in clips] == [8 * i for i in range(len(clips))]


def test_every_manifest_row_is_in_exactly_one_of_index_or_quarantine(corpus: Corpus) -> None:
    indexed = {c["row"] for c in corpus.index}
    quarantined = [q["row"] for q in corpus.quarantine]
    assert len(quarantined) == len(set(quarantined))
    assert not indexed & set(quarantined)
    assert indexed | set(quarantined) == set(range(len(ROWS)))
    assert {q["row"]: q["reason"] for q in corpus.quarantine} == {corpus.row(k): v for k, v in BAD.items()}


def test_two_dask_workers_curate_the_hostile_corpus_like_the_cli_did(corpus: Corpus, tmp_path: Path) -> None:
    from show1.config import Executor
    from show1.data.curate import curate
    from show1.data.executors import chunk_runner

    with chunk_runner(Executor(kind="dask", workers=2)) as run:  # a LocalCluster of 2 worker processes
        curate(corpus.root / "manifest.csv", tmp_path / "out", corpus.params, run_chunks=run)
    for name in ("index.jsonl", "quarantine.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (corpus.out / name).read_bytes(), name


def test_shards_load_with_every_clip_at_every_size(corpus: Corpus) -> None:
    sizes = [(s.width, s.height) for s in corpus.params.curate.clip.sizes]
    for shard in {clip["shard"] for clip in corpus.index}:
        verify_shard(corpus.out / shard)
    reader = ShardReader(corpus.out)
    for clip in corpus.index:
        for width, height in sizes:
            frames = reader.frames(clip["shard"], f"{clip['tensor']}/{width}x{height}", clip["frame_start"],
                                   clip["num_frames"])
            assert frames.dtype == np.uint8
            assert frames.shape == (clip["num_frames"], height, width, 3)
    assert len({c["content_hash"] for c in corpus.index}) == len(corpus.index)


# ------------------------------------------------------------------------------------- the details


def test_enormous_resolution_is_rejected_from_the_header_naming_size_and_limits(corpus: Corpus) -> None:
    for label in ("enormous", "enormous_header_only"):
        error = next(q for q in corpus.quarantine if q["row"] == corpus.row(label))["error"]
        assert "8192x4352" in error and "4096x4096" in error and label in error, error
    # The header-only copy has no frame at all: decoding it would have made it `undecodable`.
    with video.VideoFile(corpus.root / "videos" / "enormous_header_only.mp4") as source:
        assert (source.info.width, source.info.height) == (8192, 4352)
        with pytest.raises(Rejected, match="frame") as raised:
            source.read_rotation()
    assert raised.value.reason == "undecodable"


def test_html_caption_is_cleaned_and_kept(corpus: Corpus) -> None:
    assert {c["caption"] for c in corpus.clips("html_caption")} == {HTML_CLEANED}


def test_content_not_the_file_name_decides_the_format(corpus: Corpus) -> None:
    codecs = {label: corpus.sources[corpus.row(label)]["codec"]
              for label in ("mp4_as_avi", "mp4_no_extension", "webm_as_mp4")}
    assert codecs == {"mp4_as_avi": "h264", "mp4_no_extension": "h264", "webm_as_mp4": "vp9"}
    with av.open(str(corpus.root / "videos" / "webm.mp4")) as container:
        assert "webm" in container.format.name


def _displayed_frames(path: Path) -> np.ndarray:
    """Every frame as ffmpeg displays it (its autorotation applies the display matrix): an independent
    reference for the orientation, not PyAV."""
    with av.open(str(path)) as container:
        coded = container.streams.video[0]
        width, height = coded.width, coded.height
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    raw = subprocess.run([ffmpeg, "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(len(raw) // (width * height * 3), -1)


@pytest.mark.parametrize(("label", "bright"), [("rotated90", "bottom-left"), ("rotated270", "top-right")])
def test_rotated_video_is_curated_upright_from_its_displayed_portrait_frame(
        corpus: Corpus, label: str, bright: str) -> None:
    """The source is landscape 96x64 with a bright top-left quadrant, shown rotated: 90 degrees
    counter-clockwise puts the quadrant bottom-left of a 64x96 portrait frame, 270 top-right. The curated
    64x40 clip is the centre crop of that portrait frame, so the quadrant straddles its middle row."""
    path = corpus.root / ROWS[corpus.row(label)].video
    source = corpus.sources[corpus.row(label)]
    assert (source["source_width"], source["source_height"], source["rotation"]) == (
        64, 96, int(label.removeprefix("rotated")))
    assert {(c["source_width"], c["source_height"]) for c in corpus.clips(label)} == {(64, 96)}

    frames = corpus.frames(label).astype(np.float32)  # (16, 40, 64, 3)
    gray = frames.mean(axis=(0, 3))
    quadrants = {"top-left": gray[:20, :32], "top-right": gray[:20, 32:],
                 "bottom-left": gray[20:, :32], "bottom-right": gray[20:, 32:]}
    means = {name: float(q.mean()) for name, q in quadrants.items()}
    assert means[bright] > 200, means
    assert all(v < 100 for name, v in means.items() if name != bright), means

    # Frame by frame, the clip is ffmpeg's displayed frame (64 wide, 96 tall), centre-cropped to 64x40.
    displayed = _displayed_frames(path).reshape(-1, 96, 64, 3)
    _, _, left, top = video.cover_crop_box(64, 96, Size(width=64, height=40))
    reference = displayed[:, top:top + 40, left:left + 64].astype(np.float32)
    errors = np.abs(frames[:, None] - reference[None]).mean(axis=(2, 3, 4))
    assert [int(i) for i in errors.argmin(axis=1)] == [3 * k for k in range(16)]  # 8 fps from 24 fps
    assert float(errors.min(axis=1).max()) < 3, errors.min(axis=1)


def _nearest_in_time(times: list[float], grid: list[float]) -> list[int]:
    nearest = []
    for g in grid:
        distances = [abs(t - g) for t in times]
        best = int(np.argmin(distances))
        # The test times are chosen so that no grid time is (near) halfway between two frames.
        assert sorted(distances)[1] - distances[best] > 0.005, (g, times)
        nearest.append(best)
    return nearest


def test_variable_frame_rate_clip_frame_k_is_the_source_frame_nearest_k_over_fps(corpus: Corpus) -> None:
    stored = corpus.frames("vfr")
    expected = _nearest_in_time(VFR_TIMES, [k / CLIP_FPS for k in range(len(stored))])
    assert len(set(expected)) < len(expected) < len(VFR_TIMES)  # the grid both repeats and skips frames
    # Each source frame's top band has its own gray level (media.vfr_level): 16 rows of 64, rows 0-9 stored.
    bands = stored[:, 1:9].astype(np.float32).mean(axis=(1, 2, 3))
    levels = np.array([media.vfr_level(i) for i in range(len(VFR_TIMES))], dtype=np.float32)
    assert [int(np.abs(levels - b).argmin()) for b in bands] == expected
    assert float(np.abs(bands - levels[expected]).max()) < 4
    with av.open(str(corpus.root / "videos" / "vfr.mp4")) as container:
        decoded = [round(float(f.time), 3) for f in container.decode(video=0)]
    assert decoded == VFR_TIMES  # the file really is variable frame rate


def test_resolution_limits_apply_to_the_displayed_size(
        corpus: Corpus, make_params: Callable[..., Params], tmp_path: Path) -> None:
    """With max 80 wide x 100 tall, the 64x96 portrait (coded 96x64, rotated 90) fits; a 96x64 landscape
    video does not."""
    from show1.data.curate import curate

    root = tmp_path / "root"
    (root / "videos").mkdir(parents=True)
    for name in ("rotated90.mp4", "good0.mp4"):
        shutil.copyfile(corpus.root / "videos" / name, root / "videos" / name)
    manifest = media.write_manifest_csv(root / "m.csv", [
        {"video": "videos/rotated90.mp4", "caption": "Portrait, as displayed."},
        {"video": "videos/good0.mp4", "caption": "Landscape and too wide."}])
    curate(manifest, tmp_path / "out", make_params({"curate": {"filters": {"max_width": 80, "max_height": 100}}}))
    assert {c["row"] for c in read_jsonl(tmp_path / "out" / "index.jsonl")} == {0}
    [entry] = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert (entry["row"], entry["reason"]) == (1, "resolution_too_large")
    assert "96x64" in entry["error"] and "80x100" in entry["error"] and "good0.mp4" in entry["error"]


@pytest.mark.parametrize("bad", [{"max_width": 32}, {"max_height": 20}, {"max_width": 0}])
def test_resolution_limits_are_validated(make_params: Callable[..., Params], bad: dict[str, int]) -> None:
    from show1.config import ConfigError

    with pytest.raises(ConfigError, match=r"max_width|max_height"):
        make_params({"curate": {"filters": bad}})


# ------------------------------------------------------------------------------------ unusable manifests

BROKEN_MANIFESTS = {
    "missing_caption_column.csv": (b"video,id\nvideos/a.mp4,1\n", "no 'caption' column"),
    "missing_video_column.jsonl": (b'{"caption": "x", "id": 1}\n', "no 'video' column"),
    "header_only.csv": (b"video,caption\n", "no data rows"),
    "empty.csv": (b"", "empty"),
    "binary.csv": (bytes(range(256)) * 8, "column"),
    "arrays.jsonl": (b"[1, 2]\n[3]\n", "no 'video' column"),
    "manifest.parquet": (b"PAR1", "unknown manifest format"),
    "repeated_header.csv": (b"video,caption,video\nx.mp4,y,z\n", "repeated column names"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_MANIFESTS))
def test_an_unusable_manifest_is_one_clear_error_and_writes_nothing(name: str, tmp_path: Path,
                                                                     make_params: Callable[..., Params]) -> None:
    from typer.testing import CliRunner

    from show1.cli import app

    make_params()
    content, message = BROKEN_MANIFESTS[name]
    (tmp_path / name).write_bytes(content)
    result = CliRunner().invoke(app, ["--params", str(tmp_path / "params.yaml"), "curate", str(tmp_path / name),
                                      "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert message in result.output and str(tmp_path / name) in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "index.jsonl").exists()
