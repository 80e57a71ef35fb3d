"""The data cache between training and a curated folder on S3 (show1.data.shard_cache), against the stack's S3
server (moto) reached through AWS_ENDPOINT_URL: files come back whole, the cache stays within its limit and evicts
the least recently used file, a copy damaged on disk is fetched again, a download killed with SIGKILL leaves
nothing that is ever read, and two processes sharing the cache download each file once (counted in the S3
server's request log). Each file here carries the sha256 of its payload in its first 32 bytes, as shards do.

Run as a script (`python tests/test_shard_cache.py JSON`), it is the reader process of the multi-process tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import posixpath
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import s3_store

from show1.data.folder import DataFolder
from show1.data.shard_cache import CacheFull, ShardCache, StoreUnreachable
from show1.stack import object_store

REPO = Path(__file__).resolve().parents[1]


def blob(payload: bytes) -> bytes:
    """A file that can be checked on its own: the sha256 of the payload, then the payload."""
    return hashlib.sha256(payload).digest() + payload


def verify(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header = handle.read(32)
        while block := handle.read(1 << 20):
            digest.update(block)
    if header != digest.digest():
        raise ValueError("content hash mismatch")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The stack's S3 server, reached through the environment (as a training node would); yields its request log."""
    root = tmp_path_factory.mktemp("s3")
    with s3_store(root) as endpoint, pytest.MonkeyPatch.context() as env:
        for name, value in object_store.client_env(endpoint).items():
            env.setenv(name, value)
        yield root / "s3.log"


def upload(prefix: str, sizes: list[int], seed: int = 0) -> tuple[DataFolder, dict[str, bytes]]:
    """Files `shards/shard-0000N.bin` of these payload sizes at s3://show1/<prefix>."""
    folder = DataFolder(f"s3://show1/{prefix}")
    files = {f"shards/shard-{i:05d}.bin": blob(os.urandom(size)) for i, size in enumerate(sizes, seed)}
    for name, data in files.items():
        folder.write_bytes(name, data)
    return folder, files


def downloads(log: Path, folder: DataFolder, name: str) -> int:
    """GET requests the S3 server answered for this file (one per download of a file under 8 MiB)."""
    key = f"{folder}/{name}".removeprefix("s3://")
    return sum(f'"GET /{key} HTTP' in line for line in log.read_text().splitlines())


def cached_bytes(cache_dir: Path) -> int:
    """Every byte under the cache folder: finished copies, downloads in flight, locks."""
    return sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())


def cached_names(cache_dir: Path) -> set[str]:
    return {p.name.split("-", 1)[1] for p in (cache_dir / "files").iterdir()}


def wait_until(done, what: str, timeout: float = 300) -> None:
    """Poll `done()` until true: the timeout only stops a hung test (a loaded CI machine is slow, not wrong)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not {what} after {timeout:.0f} s"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ one process


def test_files_from_s3_come_back_whole_and_the_least_recently_used_go_first(s3, tmp_path) -> None:
    folder, files = upload("lru", [40_000] * 6)
    names = list(files)
    limit = 3 * 40_032 + 1000  # three files
    cache = ShardCache(folder, tmp_path / "cache", limit, verify)
    for name in names:
        assert cache.path(name).read_bytes() == files[name]
        assert cached_bytes(tmp_path / "cache") <= limit
    assert cached_names(tmp_path / "cache") == {"shard-00003.bin", "shard-00004.bin", "shard-00005.bin"}
    assert cache.path(names[3]).read_bytes() == files[names[3]]  # a hit: used now, so no longer the oldest
    assert cache.path(names[0]).read_bytes() == files[names[0]]  # fetched again: evicts shard 4, the oldest
    assert cached_bytes(tmp_path / "cache") <= limit
    assert cached_names(tmp_path / "cache") == {"shard-00000.bin", "shard-00003.bin", "shard-00005.bin"}
    assert [downloads(s3, folder, n) for n in names] == [2, 1, 1, 1, 1, 1]
    cache.close()


def test_fetching_ahead_more_than_fits_never_evicts_a_file_before_it_is_read(s3, tmp_path) -> None:
    folder, files = upload("ahead", [30_000] * 8)
    names = list(files)
    limit = 3 * 30_032 + 1000  # three files: asking for all eight ahead must not fetch, evict and fetch again
    with ShardCache(folder, tmp_path / "cache", limit, verify, ahead=2) as cache:
        cache.prefetch(names)
        wait_until(lambda: not cache._queued, "every fetch ahead done or given up")
        # Three fetched ahead (the first ones: two downloads at once may finish out of order), the rest skipped.
        ahead = cached_names(tmp_path / "cache")
        assert len(ahead) == 3 and ahead <= {posixpath.basename(n) for n in names[:4]}, ahead
        for name in names:
            assert cache.path(name).read_bytes() == files[name]
            assert cached_bytes(tmp_path / "cache") <= limit
    assert [downloads(s3, folder, n) for n in names] == [1] * len(names)
    assert cached_bytes(tmp_path / "cache") <= limit


def test_a_cached_copy_damaged_on_disk_is_fetched_again_never_returned(s3, tmp_path) -> None:
    folder, files = upload("damaged-copy", [50_000])
    [name] = files
    cache = ShardCache(folder, tmp_path / "cache", 1 << 20, verify)
    copy = cache.path(name)
    damaged = bytearray(copy.read_bytes())
    damaged[1000] ^= 0xFF
    copy.write_bytes(damaged)  # changes the file's mtime: this process verifies it again
    assert cache.path(name).read_bytes() == files[name]
    assert downloads(s3, folder, name) == 2

    # Damaged again, its size and mtime kept: a new process (here: a fresh cache) verifies a copy it did not fetch.
    copy = cache.path(name)
    stat = copy.stat()
    damaged = bytearray(copy.read_bytes())
    damaged[-1] ^= 0xFF
    copy.write_bytes(damaged)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cache.close()
    with ShardCache(folder, tmp_path / "cache", 1 << 20, verify) as fresh:
        assert fresh.path(name).read_bytes() == files[name]
    assert downloads(s3, folder, name) == 3


def test_a_cache_handed_to_a_dataloader_worker_reads_its_copies_without_fetching_again(s3, tmp_path) -> None:
    folder, files = upload("pickled", [10_000] * 2)
    with ShardCache(folder, tmp_path / "cache", 1 << 20, verify) as cache:
        for name in files:
            cache.path(name)
        worker = pickle.loads(pickle.dumps(cache))  # a spawned worker's copy: its own threads, its own checks
        with worker:
            assert [worker.path(n).read_bytes() for n in files] == list(files.values())
    assert [downloads(s3, folder, n) for n in files] == [1, 1]


def test_a_file_in_use_is_not_evicted_and_a_cache_full_of_them_says_to_raise_the_limit(s3, tmp_path) -> None:
    folder, files = upload("in-use", [40_000] * 2)
    first, second = files
    with ShardCache(folder, tmp_path / "cache", 60_000, verify, full_wait_s=0.5) as cache:
        with cache.open(first) as held:
            with pytest.raises(CacheFull, match=r"stayed full of files in use .* raise train\.data_cache\.limit_gb"):
                cache.path(second)
            assert held.read_bytes() == files[first]
        assert cache.path(second).read_bytes() == files[second]  # let go: now the first one is evicted
        assert cached_names(tmp_path / "cache") == {"shard-00001.bin"}


def test_a_local_folder_is_read_in_place_and_a_damaged_file_there_is_an_error(tmp_path) -> None:
    folder = tmp_path / "curated"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "a.bin").write_bytes(blob(b"clip"))
    (folder / "shards" / "b.bin").write_bytes(b"\0" * 32 + b"clip")
    with ShardCache(folder, tmp_path / "cache", 1 << 20, verify) as cache:
        assert cache.path("shards/a.bin") == folder / "shards" / "a.bin"
        with pytest.raises(ValueError, match=r"b\.bin is damaged .* no other copy to fetch"):
            cache.path("shards/b.bin")
        with pytest.raises(FileNotFoundError, match=r"shards/c\.bin: no such file"):
            cache.path("shards/c.bin")
    assert not (tmp_path / "cache").exists()  # nothing copied


def test_errors_name_the_url_and_say_what_to_do(s3, tmp_path) -> None:
    folder, files = upload("errors", [1000, 5000])
    small, large = files
    folder.write_bytes("shards/damaged.bin", b"\0" * 32 + os.urandom(1000))  # its header matches no payload
    with ShardCache(folder, tmp_path / "cache", 4000, verify) as cache:
        with pytest.raises(FileNotFoundError, match=r"^s3://show1/errors/shards/missing\.bin: no such file$"):
            cache.path("shards/missing.bin")
        with pytest.raises(CacheFull, match=r"^s3://show1/errors/shards/shard-00001\.bin is 5032 bytes, more than "
                                            r"the whole data cache holds \(4000 bytes\): raise train\.data_cache"):
            cache.path(large)
        assert downloads(s3, folder, large) == 0  # refused before a byte was fetched
        with pytest.raises(ValueError, match=r"^s3://show1/errors/shards/damaged\.bin failed verification in each of "
                                             r"3 downloads .* the copy in the store itself is damaged"):
            cache.path("shards/damaged.bin")
        assert downloads(s3, folder, "shards/damaged.bin") == 3
        assert not list((tmp_path / "cache" / "files").iterdir())  # never kept
        assert not list((tmp_path / "cache" / "tmp").iterdir())
        assert cache.path(small).read_bytes() == files[small]  # the cache still works


def test_a_store_that_cannot_be_reached_or_refuses_the_credentials_is_store_unreachable(s3, tmp_path,
                                                                                       monkeypatch) -> None:
    import s3fs

    check = re.escape("; check the store's credentials and endpoint: AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                      "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL; `eval \"$(show1 stack env)\"` for the stack's") + "$"
    reachable, [private] = upload("no-credentials", [1000])  # on the module's store, while the credentials are set
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries of a refused connection: 6 s → 0.1 s
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credentials: no probe of an instance's metadata
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    try:
        # A store that goes away while the cache is in use (its sizes read already, then only downloads).
        with s3_store(tmp_path / "s3") as gone:
            monkeypatch.setenv("AWS_ENDPOINT_URL", gone)
            folder, files = upload("gone", [30_000] * 3)
            first, _, last = files
            cache = ShardCache(folder, tmp_path / "cache", 70_000, verify)  # two files
            for name in files:
                assert cache.path(name).read_bytes() == files[name]  # the last one evicts the first
        with cache, cache.open(last) as held:
            with pytest.raises(StoreUnreachable, match=r"^s3://show1/gone/shards/shard-00000\.bin: the store cannot "
                                                       r"be reached .*\(EndpointConnectionError: .*\)" + check):
                cache.path(first)  # fetched again: the download fails
            with pytest.raises(StoreUnreachable, match=r"^s3://show1/gone/shards/shard-00003\.bin: .*" + check):
                cache.path("shards/shard-00003.bin")  # asked of the store: its size and version
            assert held.read_bytes() == files[last]  # what is cached is still read
            assert not list((tmp_path / "cache" / "tmp").iterdir())

        # A store that can be reached, with no credentials in the environment.
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # one opened with credentials would be reused
        with ShardCache(str(reachable), tmp_path / "cache", 70_000, verify) as cache, \
                pytest.raises(StoreUnreachable, match=r"^s3://show1/no-credentials/shards/shard-00000\.bin: .*"
                                                      r"\(NoCredentialsError: Unable to locate credentials\)" + check):
            cache.path(private)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # the next test's folders open the store with the module's settings


# ----------------------------------------------------------------------------------------- several processes


def reader(folder: DataFolder, cache_dir: Path, limit: int, names: list[str], go: Path | None = None,
           block_bytes: int = 8 << 20, fault: str | None = None) -> subprocess.Popen:
    """This file run as a script: a process that reads `names` through the cache (after `go` exists)."""
    env = dict(os.environ)
    env.pop("SHOW1_FAULT", None)
    if fault:
        env["SHOW1_FAULT"] = fault
    job = {"folder": str(folder), "cache": str(cache_dir), "limit": limit, "names": names,
           "go": str(go) if go else None, "block": block_bytes}
    return subprocess.Popen([sys.executable, __file__, json.dumps(job)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(process: subprocess.Popen) -> dict[str, str]:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out)


def test_a_download_killed_mid_file_leaves_nothing_that_is_ever_read(s3, tmp_path) -> None:
    folder, files = upload("killed", [300_000, 200_000])
    names = list(files)
    killed = reader(folder, tmp_path / "cache", 1 << 20, names, block_bytes=64 << 10,
                    fault="train.data_cache.mid_download")
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    [partial] = (tmp_path / "cache" / "tmp").iterdir()  # the first block of the first file, the rest unwritten
    assert not list((tmp_path / "cache" / "files").iterdir())

    digests = finished(reader(folder, tmp_path / "cache", 1 << 20, names))
    assert digests == {n: sha(data) for n, data in files.items()}
    assert not partial.exists()
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    assert cached_names(tmp_path / "cache") == {"shard-00000.bin", "shard-00001.bin"}


def test_two_processes_sharing_the_cache_download_each_file_once(s3, tmp_path) -> None:
    folder, files = upload("shared", [1_000_000] * 8)
    names = list(files)
    go = tmp_path / "go"
    # One reads from the first file, the other from the last: they meet in the middle, on the same files.
    processes = [reader(folder, tmp_path / "cache", 64 << 20, order, go) for order in (names, names[::-1])]
    # Both started (imports done, waiting for `go`), however slow the machine: then released together.
    wait_until(lambda: len(list(tmp_path.glob("go.ready.*"))) == 2 or any(p.poll() is not None for p in processes),
               "both readers ready")
    go.touch()
    expected = {n: sha(data) for n, data in files.items()}
    assert [finished(p) for p in processes] == [expected, expected]
    assert [downloads(s3, folder, n) for n in names] == [1] * len(names)


def main(job: dict) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if job["go"]:
        Path(f"{job['go']}.ready.{os.getpid()}").touch()
        while not Path(job["go"]).exists():
            time.sleep(0.01)
    with ShardCache(job["folder"], Path(job["cache"]), job["limit"], verify, block_bytes=job["block"]) as cache:
        digests = {name: sha(cache.path(name).read_bytes()) for name in job["names"]}
    print(json.dumps(digests, sort_keys=True))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
