"""A disk that fills up while curation writes a shard, and while training writes a checkpoint: the real `show1`
command ends with one `error:` line naming what it was writing, leaves nothing half-written under a final name (and
the curation it was replacing whole), and the same command completes once space is freed, to the outputs of a run
on a roomy disk.

The output folder is a tmpfs mounted by the test (root, or CAP_SYS_ADMIN), filled by a filler file up to the room
the test leaves; freeing space is deleting the filler. Where mounting is refused, RLIMIT_FSIZE stands in, and a
warning says so (SHOW1_DISK_FULL_BY=rlimit forces it): a write past the limit fails with EFBIG, but the limit is per
file, so the test sets it between the largest file and the next (curation fails at its big shard as on a tmpfs,
training at its first checkpoint rather than its second).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import media
import pytest
import warm
import yaml
from processes import REPO, TRAINING_SMALL, show1

from show1 import atomic
from show1.config import load_params
from show1.data.curate import curate
from show1.data.shards import verify_shard
from show1.training.runs import latest_checkpoint
from show1.weight_files import check_folder

PAGE = os.sysconf("SC_PAGE_SIZE")


def pages(size: int) -> int:
    """The bytes a file of `size` bytes takes on a tmpfs (whole pages)."""
    return -(-size // PAGE) * PAGE


@dataclass
class SmallDisk:
    """A folder whose writes run out of room on demand: a tmpfs nearly filled by a filler file, or (where no tmpfs
    can be mounted) commands run under RLIMIT_FSIZE."""

    folder: Path
    by: str  # "tmpfs" | "rlimit"
    file_limit: int | None = None

    @property
    def reason(self) -> str:
        """How the command says it ran out of room."""
        return "no space left on device" if self.by == "tmpfs" else "file size limit exceeded"

    def fill(self, room: int, file_limit: int) -> None:
        """tmpfs: leave `room` bytes free. rlimit: commands run until `free` may write files of `file_limit` bytes."""
        if self.by == "rlimit":
            self.file_limit = file_limit
            return
        stats = os.statvfs(self.folder)
        fd = os.open(self.folder / "filler", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, stats.f_bavail * stats.f_frsize - room)
        finally:
            os.close(fd)
        stats = os.statvfs(self.folder)
        assert abs(stats.f_bavail * stats.f_frsize - room) <= PAGE

    @contextlib.contextmanager
    def limited_here(self) -> Iterator[None]:
        """rlimit: this process's own writes run under the file size limit (and fail with EFBIG) for the block."""
        if self.file_limit is None:
            yield
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_limit, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    def free(self) -> None:
        (self.folder / "filler").unlink(missing_ok=True)
        self.file_limit = None

    def run(self, params: Path, *args: str) -> subprocess.CompletedProcess:
        """Run `show1 --params PARAMS ARGS…` (in a process of its own), under the file size limit while there is one
        (the process then starts cold, not forked from tests/warm.py's server)."""
        limit = self.file_limit
        if limit is None:
            return show1(params, *args)

        def limited() -> None:  # in the child: a write past the limit fails with EFBIG rather than killing it
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        environment = dict(os.environ, HF_HUB_OFFLINE="1")
        environment.pop("SHOW1_FAULT", None)
        return warm.run([sys.executable, "-m", "show1.cli", "--params", str(params), *args], cwd=REPO,
                        capture_output=True, text=True, env=environment, timeout=300, preexec_fn=limited)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.environ.get("SHOW1_DISK_FULL_BY") != "rlimit":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192m,mode=0755", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
        if mounted.returncode == 0:
            try:
                yield SmallDisk(folder, "tmpfs")
            finally:
                subprocess.run(["umount", str(folder)], check=True)
            return
        reason = f"cannot mount a tmpfs ({mounted.stderr.strip() or mounted.returncode})"
    else:
        reason = "SHOW1_DISK_FULL_BY=rlimit"
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    if hard != resource.RLIM_INFINITY and hard < 64 * 2**20:
        pytest.skip(f"{reason}, and the hard RLIMIT_FSIZE ({hard} bytes) is too low to stand in for a full disk")
    warnings.warn(f"{reason}: a full disk is simulated with RLIMIT_FSIZE (a file size limit, per file)", stacklevel=1)
    yield SmallDisk(folder, "rlimit")


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line a failed command printed (and no traceback)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def temporaries(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if ".tmp-" in p.name]


def test_a_row_appended_when_the_disk_fills_is_cut_back_off(small_disk):
    """How metrics.jsonl is written: a full disk takes the row that crosses its last free page part-way (a short
    write, then ENOSPC); the file must not end in that half row."""
    path = small_disk.folder / "metrics.jsonl"
    row = json.dumps({"step": 1, "loss": 0.5}).encode() + b"\n"
    assert PAGE % len(row)  # the row that crosses the page's end is written part-way
    small_disk.fill(room=PAGE, file_limit=PAGE)
    with small_disk.limited_here(), open(path, "ab", buffering=0) as handle, \
            pytest.raises(atomic.DiskFull) as raised:
        for _ in range(PAGE):
            atomic.append(handle, row, path)
    assert raised.value.filename == str(path)
    assert path.read_bytes() == row * (PAGE // len(row))


# ------------------------------------------------------------------------------------------------ curation

BIG = 5  # the chunk whose shard does not fit: its video is three times as long as the others


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, write_params) -> dict[str, Path]:
    """Eight videos, one per chunk, the sixth three times as long (its shard is the largest file by far), curated
    once on a roomy disk; and a curation of three other videos for the new one to replace."""
    folder = tmp_path_factory.mktemp("corpus")
    rows = [{"video": media.write_video(folder / f"v{seed}.mp4", seed=seed, frames=144 if seed == BIG else 48).name,
             "caption": f"clip number {seed}"} for seed in range(8)]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    earlier = folder / "earlier.jsonl"
    earlier.write_text("".join(json.dumps({"video": media.write_video(folder / f"e{seed}.mp4", seed=seed).name,
                                           "caption": f"earlier {seed}"}) + "\n" for seed in (20, 21, 22)))
    params = write_params(folder / "params", {"curate": {"rows_per_shard": 1}})
    params_file = folder / "params" / "params.yaml"
    curate(manifest, folder / "reference", params)
    curate(earlier, folder / "earlier", params)
    return {"manifest": manifest, "params": params_file, "reference": folder / "reference",
            "earlier": folder / "earlier"}


def outputs(out: Path) -> dict[str, bytes]:
    """What other tools read, with its bytes (summary.json differs only in chunks_skipped)."""
    files = [out / "index.jsonl", out / "index.parquet", out / "quarantine.jsonl",
             *sorted((out / "shards").iterdir()), *sorted((out / "parts").iterdir())]
    return {f.relative_to(out).as_posix(): f.read_bytes() for f in files}


def published(out: Path) -> dict[str, bytes]:
    """The curation a reader sees: its published files and the shards its index reads, each one whole."""
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    shards = sorted({row["shard"] for row in index})
    for shard in shards:
        verify_shard(out / shard)
    names = ("index.jsonl", "index.parquet", "quarantine.jsonl", "summary.json", "version.json", *shards)
    return {name: (out / name).read_bytes() for name in names}


def test_a_curation_that_fills_the_disk_fails_in_one_line_and_completes_once_space_is_freed(corpus, small_disk):
    out = small_disk.folder / "out"
    shutil.copytree(corpus["earlier"], out)
    before = published(out)
    reference = corpus["reference"]
    parts = [json.loads((reference / "parts" / f"part-{i:05d}.json").read_bytes()) for i in range(8)]
    written = [(reference / p["shard"]).stat().st_size for p in parts[:BIG]]
    written += [(reference / "parts" / f"part-{i:05d}.json").stat().st_size for i in range(BIG)]
    big = (reference / parts[BIG]["shard"]).stat().st_size
    others = [f.stat().st_size for f in reference.rglob("*") if f.is_file() and f != reference / parts[BIG]["shard"]]
    assert big > 1.5 * max(others)
    # Room for the chunks before BIG and half of BIG's shard; or a file size limit only BIG's shard crosses.
    small_disk.fill(room=sum(map(pages, written)) + pages(big) // 2, file_limit=(big + max(others)) // 2)
    command = ("curate", str(corpus["manifest"]), "--out", str(out), "--quiet")

    full = small_disk.run(corpus["params"], *command)
    line = error_line(full)
    assert line.startswith(f"error: {small_disk.reason} writing {out / parts[BIG]['shard']}: "), line
    assert line.endswith(" and run the same command again"), line
    assert published(out) == before  # a reader still sees the curation it was replacing, every shard whole
    assert temporaries(out) == []
    assert not (out / parts[BIG]["shard"]).exists() and not (out / f"parts/part-{BIG:05d}.json").exists()
    for i in range(BIG):  # the chunks before it are committed, each part naming its whole shard
        assert json.loads((out / f"parts/part-{i:05d}.json").read_bytes()) == parts[i]
        verify_shard(out / parts[i]["shard"])

    small_disk.free()
    again = small_disk.run(corpus["params"], *command)
    assert again.returncode == 0, again.stderr
    assert outputs(out) == outputs(reference)  # the earlier curation's shards and parts are gone too
    assert temporaries(out) == []


def test_an_ingest_that_fills_the_disk_fails_in_one_line_and_completes_once_space_is_freed(corpus, small_disk):
    """`show1 ingest` of one new, long clip into a published dataset, the disk filling while its shard is written:
    one line, the dataset as it was, and the same command ingests it once space is freed."""
    out = small_disk.folder / "out"
    shutil.copytree(corpus["earlier"], out)
    before = published(out)
    new = corpus["manifest"].with_name("new.jsonl")
    new.write_text(corpus["manifest"].read_text().splitlines()[BIG] + "\n")  # the long clip: the big shard
    reference = corpus["reference"]
    big = (reference / json.loads((reference / f"parts/part-{BIG:05d}.json").read_bytes())["shard"]).stat().st_size
    small_disk.fill(room=pages(big) // 2, file_limit=big // 2)
    command = ("ingest", str(new), "--data", str(out), "--no-event")

    line = error_line(small_disk.run(corpus["params"], *command))
    assert line.startswith(f"error: {small_disk.reason} writing {out}/"), line
    assert line.endswith(" and run the same command again"), line
    assert published(out) == before and temporaries(out) == []

    small_disk.free()
    again = small_disk.run(corpus["params"], *command)
    assert again.returncode == 0, again.stderr
    index = [json.loads(row) for row in (out / "index.jsonl").read_text().splitlines()]
    captions = list(dict.fromkeys(row["caption"] for row in index))  # each video gives one clip or more
    assert captions == [*(f"earlier {seed}" for seed in (20, 21, 22)), f"clip number {BIG}"]
    published(out)  # every shard the index reads is whole
    assert temporaries(out) == []


# ------------------------------------------------------------------------------------------------ training

SMALL = TRAINING_SMALL


@pytest.fixture(scope="module")
def training(tmp_path_factory) -> dict[str, Path]:
    """Curated demo clips and one uninterrupted 3-step base run (a checkpoint after every step), from the CLI."""
    folder = tmp_path_factory.mktemp("training")
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(SMALL))
    curate(REPO / "data/manifests/demo.csv", folder / "curated", load_params(params_file))
    whole = show1(params_file, *train_args(folder / "curated", folder / "whole"))
    assert whole.returncode == 0, whole.stderr
    return {"params": params_file, "data": folder / "curated", "whole": folder / "whole"}


def train_args(data: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return ("train", "--stage", "base", "--data", str(data), "--out", str(out), "--max-steps", "3",
            "--checkpoint-every", "1", "--no-track", "--quiet", *extra)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_training_that_fills_the_disk_while_checkpointing_fails_in_one_line_and_resumes_to_the_same_losses(
        training, small_disk):
    run = small_disk.folder / "run"
    whole = training["whole"]
    checkpoint = sorted(f.stat().st_size for f in (whole / "checkpoints" / "step-000001").rglob("*") if f.is_file())
    # Room for the run's small files, its first checkpoint and half of its second; or a file size limit that only
    # the largest file of a checkpoint (its optimizer state) crosses, so that the first one fails.
    small_disk.fill(room=64 * PAGE + sum(map(pages, checkpoint)) * 3 // 2,
                    file_limit=(checkpoint[-1] + checkpoint[-2]) // 2)
    written = ["step-000001"] if small_disk.by == "tmpfs" else []

    full = small_disk.run(training["params"], *train_args(training["data"], run))
    line = error_line(full)
    failed = f"step-{len(written) + 1:06d}"
    assert line == (f"error: {small_disk.reason} writing {run / 'checkpoints' / failed}: "
                    f"{'free space' if small_disk.by == 'tmpfs' else 'raise the file size limit (ulimit -f)'} and "
                    f"resume: run the same command with --resume latest"), line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == written  # no staging folder left either
    assert latest_checkpoint(run) == (run / "checkpoints" / written[-1] if written else None)
    for name in written:
        check_folder(run / "checkpoints" / name, sealed=True)
    assert temporaries(run) == [] and not (run / "final").exists()
    rows = (run / "metrics.jsonl").read_text()
    assert rows.endswith("\n") and losses(run) == losses(whole)[:len(written) + 1]  # every row whole, up to the step

    small_disk.free()
    resumed = small_disk.run(training["params"], *train_args(training["data"], run, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(whole)  # every step once, bit for bit
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (run / "final" / name).read_bytes() == (whole / "final" / name).read_bytes()
    assert temporaries(run) == []
