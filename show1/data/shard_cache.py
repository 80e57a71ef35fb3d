"""Local, size-bounded, verified copies of a remote dataset folder's files, for training from an object store.

Training reads its shards by name (`shards/shard-00000.safetensors`, `index.jsonl`) from a `DataFolder`. When the
folder is an fsspec URL (`s3://bucket/prefix`, `gs://…`), `ShardCache.path(name)` gives a local copy instead,
and `prefetch(names)` fetches the next ones in the background (at most `ahead` at once), so the GPU does not wait
on the network. What it promises:

- **Never a bad file.** Every download goes to a temporary in the cache, is checked by `verify` (the shard
  format's own content hash) and only then renamed into place. A cached copy this process did not download
  itself is verified again the first time it is used here, so a copy damaged on disk is deleted and fetched
  again, never returned. The (inode, size, mtime) each file was verified at is kept, so a hot file is hashed
  once per process, not at every read. A file that fails verification after 3 downloads is an error: the copy
  in the store itself is damaged.
- **Bounded disk.** The bytes under the cache folder (finished files and downloads in flight, which reserve
  their whole size up front) stay within `limit_bytes`: room is made by deleting the least recently used files
  (the access time this module sets at each use). A finished download is renamed from `tmp/` into `files/` under
  the lock that counts them, so no count misses a file on its way. A file in use is never deleted: `with
  cache.open(name) as path:` holds it for the block, and `path(name)` holds the file it returns until the same
  thread's next call (or `close()`). A file larger than the whole limit is an error asking to raise
  `train.data_cache.limit_gb`. A file fetched ahead and not read yet is evicted last (it is needed next), and
  never to fetch another one ahead: when there is no other room, that fetch is skipped, and `path()` fetches the
  file when asked for it.
- **Shared by processes.** DataLoader workers and torchrun ranks on one machine share one cache folder. Each
  object has two flock files: `<key>.fetch`, held exclusively while it is downloaded (a second process waits,
  then uses the first one's copy: each file is downloaded once), and `<key>.use`, held shared by every reader.
  Eviction takes both without waiting and skips a file when it cannot. Space is reserved under one lock for
  the whole folder (`.lock`). flock locks die with their process, so a process killed with SIGKILL leaves no
  stale lock; the temporary it was writing is deleted by the next process that makes room or opens the cache
  (a temporary whose `.fetch` lock is free has no writer). The lock files stay (empty, two per cached version).
- **A changed store is noticed.** A cached copy is named by the folder's URL, the file's name and the
  store's ETag (or modification time) and size, read once per process per name: a re-curated folder's new
  shard never reuses the old one's copy (the old one ages out). One cache folder can serve several datasets.

A local folder needs no copy: `path(name)` is the file itself, verified once per process, and a damaged one is
an error (there is no other copy to fetch). Credentials and endpoints come from the environment, as the folder's
filesystem reads them (`AWS_ENDPOINT_URL`, … see `show1.data.folder`); a store that cannot be reached or refuses
them is `StoreUnreachable` (an OSError naming the URL, the store client's error and what to check), raised at
once: the store's client has already retried its network errors (botocore: `AWS_MAX_ATTEMPTS`, `AWS_RETRY_MODE`).
A `ShardCache` may be forked or pickled into DataLoader workers: each process starts its own threads, holds its
own files and verifies for itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from show1 import atomic
from show1.data.folder import DataFolder
from show1.faults import fault_point

ATTEMPTS = 3  # downloads of one file before its copy in the store is called damaged
BLOCK = 8 << 20  # bytes read from the store at once: memory stays bounded for shards of any size
LIMIT_SETTING = "train.data_cache.limit_gb"
# What tells one version of a remote file from the next, best first (S3's and GCS's ETag, GCS's md5, a
# modification time for stores without one). ETag first: s3fs gives LastModified in different time zones from a
# listing and from a HEAD, which would give one object two names in the cache.
VERSION_FIELDS = ("ETag", "etag", "md5Hash", "generation", "LastModified", "last_modified", "mtime", "updated")

log = logging.getLogger(__name__)


class CacheFull(RuntimeError):
    """The data cache cannot hold a file: the file is larger than its limit, or the rest of it stays in use."""


class StoreUnreachable(OSError):
    """The folder's store cannot be reached, or refuses this machine's credentials (none, wrong, expired)."""


# What a store's client raises when it cannot be reached or lets no one in, besides the builtins below: botocore's
# NoCredentialsError and EndpointConnectionError, aiohttp's connection errors, google-auth's… (their modules, so that
# none of these packages must be installed to tell).
_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google.auth", "google.api_core")


@contextlib.contextmanager
def _reading_store(url: str) -> Iterator[None]:
    """Around a read from the store: its reachability and credential errors become StoreUnreachable naming `url`.
    A missing file stays FileNotFoundError; other errors (a server error, a file replaced while read) pass as
    they are."""
    try:
        yield
    except (FileNotFoundError, StoreUnreachable):
        raise
    except Exception as exc:
        if not (isinstance(exc, (PermissionError, ConnectionError, TimeoutError))
                or any(c.__module__.startswith(_CLIENT_MODULES) for c in type(exc).__mro__)):
            raise
        error = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
        raise StoreUnreachable(
            f"{url}: the store cannot be reached or refuses the credentials ({error}); check the store's credentials "
            f"and endpoint: AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL; "
            f"`eval \"$(show1 stack env)\"` for the stack's") from exc


class ShardCache:
    """Local, size-bounded, verified copies of a remote folder's files (shards, index)."""

    def __init__(self, folder: DataFolder | str | Path, cache_dir: Path | str, limit_bytes: int,
                 verify: Callable[[Path], None], ahead: int = 2, *, block_bytes: int = BLOCK,
                 full_wait_s: float = 60.0) -> None:
        """`verify(path)` raises ValueError when the file at `path` is not whole and correct. `full_wait_s`: how
        long `path()` waits for other readers to release files when the cache has no room (then CacheFull)."""
        if limit_bytes <= 0:
            raise ValueError(f"the data cache's limit must be positive, not {limit_bytes} bytes ({LIMIT_SETTING})")
        self.folder = DataFolder(folder)
        self.cache_dir = Path(cache_dir)
        self.limit_bytes = int(limit_bytes)
        self.verify = verify
        self.ahead = max(1, int(ahead))
        self.block_bytes = int(block_bytes)
        self.full_wait_s = float(full_wait_s)
        self._files = self.cache_dir / "files"
        self._tmp = self.cache_dir / "tmp"
        self._locks = self.cache_dir / "locks"
        self._fresh_process_state()
        if self.folder.local is None:
            for sub in (self._files, self._tmp, self._locks):
                sub.mkdir(parents=True, exist_ok=True)
            with self._space_lock():
                self._remove_stale_temporaries()

    def _fresh_process_state(self) -> None:
        """What belongs to one process: its threads, the files it holds, what it has verified."""
        self._pid = os.getpid()
        self._state = threading.Lock()
        self._verified: dict[Path, tuple[int, int, int]] = {}  # file → (inode, size, mtime) when it was verified
        self._versions: dict[str, tuple[str, int]] = {}  # name → (cache key, size), from the store once
        self._ahead_unread: set[Path] = set()  # fetched ahead by this process, not asked for yet
        self._queued: set[str] = set()
        self._held: dict[int, IO[bytes]] = {}  # thread → its `.use` lock on the file `path()` last returned
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def _this_process(self) -> None:
        if os.getpid() != self._pid:  # forked (a DataLoader worker): the parent's threads and locks are not ours
            self._fresh_process_state()

    def __getstate__(self) -> dict[str, Any]:
        keep = ("folder", "cache_dir", "limit_bytes", "verify", "ahead", "block_bytes", "full_wait_s", "_files",
                "_tmp", "_locks")
        return {name: self.__dict__[name] for name in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh_process_state()

    def __enter__(self) -> ShardCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------- reading

    def path(self, name: str) -> Path:
        """A local path to a verified, whole copy of `name` (relative to the folder), fetching it if needed.
        Blocks until ready. The file stays held (never evicted) until this thread's next `path()` call or
        `close()`; use `open()` to hold several at once. Raises FileNotFoundError naming the URL when the store
        has no such file, ValueError when every download fails verification, CacheFull when it cannot fit,
        StoreUnreachable when the store cannot be reached or refuses the credentials."""
        self._this_process()
        thread = threading.get_ident()
        with self._state:
            previous = self._held.pop(thread, None)
        if previous is not None:  # let go first: a cache with room for one file still works
            previous.close()
        local, held = self._acquire(name)
        if held is not None:
            with self._state:
                self._held[thread] = held
        return local

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Path]:
        """`with cache.open(name) as path:` a verified local copy of `name`, held (never evicted) for the block."""
        self._this_process()
        local, held = self._acquire(name)
        try:
            yield local
        finally:
            if held is not None:
                held.close()

    def prefetch(self, names: Iterable[str]) -> None:
        """Start fetching these names in the background (at most `ahead` downloads at once), in order. A file that
        cannot be fetched now is left for `path()`, which raises the error then."""
        if self.folder.local is not None:
            return  # read in place
        self._this_process()
        for name in names:
            with self._state:
                if self._closed or name in self._queued:
                    continue
                self._queued.add(name)
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.ahead, thread_name_prefix="shard-cache")
                pool = self._pool
            pool.submit(self._fetch_ahead, name)

    def close(self) -> None:
        """Stop the background downloads (a download in progress ends first) and let go of every held file."""
        if os.getpid() != self._pid:
            return
        with self._state:
            self._closed = True
            pool, self._pool = self._pool, None
            held, self._held = list(self._held.values()), {}
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for handle in held:
            handle.close()

    # ----------------------------------------------------------------------------------------------- internals

    def _acquire(self, name: str) -> tuple[Path, IO[bytes] | None]:
        """The verified file for `name`, and the `.use` lock that holds it (None for a local folder)."""
        if self.folder.local is not None:
            return self._local_file(self.folder.local, name), None
        key, size = self._version(name)
        target = self._target(key, name)
        held = self._lock(key, "use", fcntl.LOCK_SH)  # taken first: from here on, no one evicts it
        try:
            self._ensure(name, key, size, target, ahead=False)
            _touch(target)
        except BaseException:
            held.close()
            raise
        with self._state:
            self._ahead_unread.discard(target)
        return target, held

    def _fetch_ahead(self, name: str) -> None:
        try:
            key, size = self._version(name)
            target = self._target(key, name)
            if self._ensure(name, key, size, target, ahead=True):
                with self._state:
                    self._ahead_unread.add(target)
        except Exception as exc:  # path() meets the same error and raises it
            log.debug("fetching %s ahead failed: %s", self.folder.name(name), exc)
        finally:
            with self._state:
                self._queued.discard(name)

    def _local_file(self, root: Path, name: str) -> Path:
        file = root / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file")
        if not self._usable(file, name):
            raise ValueError(f"{file} is damaged (it fails verification); a local folder is read in place, with no "
                             f"other copy to fetch: curate it again or restore it")
        return file

    def _version(self, name: str) -> tuple[str, int]:
        """The cache key and size of the store's current `name` (asked once per process and name)."""
        with self._state:
            found = self._versions.get(name)
        if found is not None:
            return found
        url = self.folder.name(name)
        try:
            with _reading_store(url):
                info = self.folder.fs.info(self.folder._remote(name))
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no such file") from None
        if info.get("type", "file") != "file":
            raise IsADirectoryError(f"{url} is a folder, not a file")
        size = int(info["size"])
        if size > self.limit_bytes:
            raise CacheFull(f"{url} is {size} bytes, more than the whole data cache holds ({self.limit_bytes} "
                            f"bytes): raise {LIMIT_SETTING}")
        version = next((str(info[f]) for f in VERSION_FIELDS if info.get(f) is not None), "")
        identity = json.dumps([str(self.folder.location), name, size, version])
        found = (hashlib.sha256(identity.encode()).hexdigest()[:32], size)
        with self._state:
            self._versions[name] = found
        return found

    def _target(self, key: str, name: str) -> Path:
        return self._files / f"{key}-{posixpath.basename(name)}"  # the name's suffix kept, for readers that look

    def _ensure(self, name: str, key: str, size: int, target: Path, ahead: bool) -> bool:
        """Make `target` a verified copy of `name`; False when fetching ahead found no room."""
        if self._usable(target, name):
            return True
        with self._lock(key, "fetch", fcntl.LOCK_EX):  # one download per file on this machine
            if self._usable(target, name):  # another thread or process fetched it while we waited
                return True
            with self._state:
                self._verified.pop(target, None)
            target.unlink(missing_ok=True)  # absent, or damaged: fetched again
            return self._download(name, key, size, target, ahead)

    def _usable(self, file: Path, name: str) -> bool:
        """Whether `file` is there and whole: verified now, or earlier in this process and unchanged since."""
        try:
            stat = file.stat()
        except FileNotFoundError:
            return False
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._state:
            if self._verified.get(file) == stamp:
                return True
        try:
            self.verify(file)
        except ValueError as exc:
            log.warning("%s (%s) is damaged (%s)%s", file, self.folder.name(name), exc,
                        "" if self.folder.local is not None else ": fetching it again")
            return False
        except FileNotFoundError:
            return False  # evicted while it was read: only a fetch ahead reads a file it does not hold
        with self._state:
            self._verified[file] = stamp
        return True

    def _download(self, name: str, key: str, size: int, target: Path, ahead: bool) -> bool:
        url = self.folder.name(name)
        failure: Exception | None = None
        for attempt in range(1, ATTEMPTS + 1):
            tmp = self._reserve(key, size, url, ahead)
            if tmp is None:
                return False
            try:
                self._copy(name, tmp, size)
                self.verify(tmp)
                # No fsync: a copy a power cut left damaged fails verification at its next process's first use.
                # Renamed under the space lock: `_make_room` counts `files/` then `tmp/`, and a rename between the
                # two would hide this file from the count (and let the cache grow past its limit). A file fetched
                # ahead is marked unread under it too, before another fetch ahead can see it as evictable.
                with self._space_lock():
                    os.replace(tmp, target)
                    stat = target.stat()
                    with self._state:
                        self._verified[target] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
                        if ahead:
                            self._ahead_unread.add(target)
            except FileNotFoundError:
                raise FileNotFoundError(f"{url}: no such file") from None
            except StoreUnreachable:
                raise  # the store's client has retried already; no credentials are no better at the next attempt
            except (ValueError, OSError) as exc:
                failure = exc
                log.warning("%s: download %d of %d failed (%s)", url, attempt, ATTEMPTS, exc)
                continue
            finally:
                tmp.unlink(missing_ok=True)
            log.info("fetched %s (%d bytes) into the data cache", url, size)
            return True
        if isinstance(failure, ValueError):
            raise ValueError(f"{url} failed verification in each of {ATTEMPTS} downloads ({failure}): the copy in the "
                             f"store itself is damaged; curate the folder again or restore the file")
        raise OSError(f"{url} could not be fetched in {ATTEMPTS} attempts: {failure}")

    def _copy(self, name: str, tmp: Path, size: int) -> None:
        """The remote file's bytes into `tmp`, a block at a time."""
        url = self.folder.name(name)
        written = 0
        with _reading_store(url):  # only the store's calls: an error writing `tmp` is this machine's, as it is
            source = self.folder.fs.open(self.folder._remote(name), "rb", block_size=self.block_bytes)
        with source, open(tmp, "r+b") as out:
            while True:
                with _reading_store(url):
                    block = source.read(self.block_bytes)
                if not block:
                    break
                written += len(block)
                if written > size:
                    raise ValueError(f"longer than the {size} bytes the store listed (replaced while read?)")
                out.write(block)
                fault_point("train.data_cache.mid_download")
        if written != size:
            raise ValueError(f"{written} bytes read, the store listed {size}")

    def _reserve(self, key: str, size: int, url: str, ahead: bool) -> Path | None:
        """A temporary of `size` bytes in the cache, once there is room for it (its whole size counts from now).
        Fetching ahead gives up at once (None); `path()` waits `full_wait_s` for readers to let go, then raises."""
        deadline = time.monotonic() + self.full_wait_s
        while True:
            with self._space_lock():
                self._remove_stale_temporaries()
                if self._make_room(size, ahead):
                    fd, name = tempfile.mkstemp(prefix=f"{atomic.TMP_MARK}{key}.", dir=self._tmp)
                    try:
                        os.ftruncate(fd, size)  # sparse: reserves the size in the count, not yet on disk
                    finally:
                        os.close(fd)
                    return Path(name)
            if ahead:
                return None
            if time.monotonic() > deadline:
                raise CacheFull(f"{url}: the data cache ({self.cache_dir}, {self.limit_bytes} bytes) stayed full of "
                                f"files in use for {self.full_wait_s:.0f} s; raise {LIMIT_SETTING} (it must hold the "
                                f"shards every reader holds at once, plus those fetched ahead)")
            time.sleep(0.2)

    def _make_room(self, size: int, ahead: bool) -> bool:
        """Evict least recently used files until `size` more bytes fit (caller holds the space lock). The count is
        exact because nothing moves between `files/` and `tmp/` while the lock is held (see `_download`)."""
        total = 0
        files: list[tuple[int, Path, int]] = []
        for folder in (self._files, self._tmp):
            for entry in os.scandir(folder):
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                total += stat.st_size
                if folder is self._files:
                    files.append((stat.st_atime_ns, Path(entry.path), stat.st_size))
        if total + size <= self.limit_bytes:
            return True
        with self._state:
            unread = set(self._ahead_unread)
        # Files fetched ahead and not read yet go last (they are needed next), and a fetch ahead never evicts them.
        for _, _, file, length in sorted((f in unread, atime, f, length) for atime, f, length in files):
            if ahead and file in unread:
                break
            if self._evict(file):
                total -= length
                if total + size <= self.limit_bytes:
                    return True
        return False

    def _evict(self, file: Path) -> bool:
        """Delete `file` unless someone reads or fetches it now."""
        key = file.name.split("-", 1)[0]
        with contextlib.ExitStack() as stack:
            for kind in ("fetch", "use"):
                handle = self._try_lock(key, kind)
                if handle is None:
                    return False
                stack.callback(handle.close)
            file.unlink(missing_ok=True)
        with self._state:
            self._verified.pop(file, None)
            self._ahead_unread.discard(file)
        log.debug("evicted %s from the data cache", file)
        return True

    def _remove_stale_temporaries(self) -> int:
        """Delete the temporaries of killed downloads: those whose `.fetch` lock no process holds."""
        count = 0
        for tmp in self._tmp.glob(f"{atomic.TMP_MARK}*"):
            key = tmp.name[len(atomic.TMP_MARK):].split(".", 1)[0]
            handle = self._try_lock(key, "fetch")
            if handle is not None:
                with handle:
                    tmp.unlink(missing_ok=True)
                count += 1
        return count

    def _lock(self, key: str, kind: str, flags: int) -> IO[bytes]:
        """The open lock file `locks/<key>.<kind>`, holding flock `flags` (waiting for it); close it to let go."""
        handle = open(self._locks / f"{key}.{kind}", "ab")  # noqa: SIM115 (the caller closes it to let go)
        try:
            fcntl.flock(handle, flags)
        except BaseException:
            handle.close()
            raise
        return handle

    def _try_lock(self, key: str, kind: str) -> IO[bytes] | None:
        """`_lock` exclusively without waiting: None when another reader or download holds it."""
        try:
            return self._lock(key, kind, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None

    @contextlib.contextmanager
    def _space_lock(self) -> Iterator[None]:
        with open(self.cache_dir / ".lock", "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def _touch(file: Path) -> None:
    """Record a use: the access time orders eviction (the modification time stays, it keys verification)."""
    stat = file.stat()
    os.utime(file, ns=(time.time_ns(), stat.st_mtime_ns))
