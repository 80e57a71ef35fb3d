"""Where a training or evaluation process reads a curated folder's index and shards.

A local folder is read in place. A folder at a URL (`s3://bucket/curated`, any fsspec URL) is read from local
copies in a size-bounded cache shared by the machine's processes (`show1.data.shard_cache.ShardCache`,
`train.data_cache`): each file is verified before use (a shard by the content hash in its header, the index by its
pages' checksums), so a damaged copy is fetched again and never read, and shards are fetched ahead of the loader
(`prefetch`). The index and its training view (`index.arrow`, checked against the sha256 the index records) stay
held (never evicted) for as long as the process reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from show1.config import DataCache
from show1.data.clip_index import INDEX_PARQUET, INDEX_VIEW, index_path, verify_index
from show1.data.folder import DataFolder
from show1.data.shard_cache import ShardCache
from show1.data.shards import verify_shard
from show1.provenance import file_digest


def _has_sha256(path: Path, expected: str) -> None:
    if file_digest(path) != expected:
        raise ValueError(f"{path}: damaged (its sha256 is not the one the index records)")


class CuratedFiles:
    """The index and shards of the curated folder `root` (a path or any fsspec URL) as local files."""

    def __init__(self, root: str | Path, cache: DataCache | None = None, cache_dir: Path | None = None) -> None:
        self.folder = DataFolder(root)
        self.root = self.folder.local or str(self.folder)
        self._shards = self._index = self._view = None
        if self.folder.local is None:
            if cache is None or cache_dir is None:
                raise ValueError(f"{root}: a curated folder at a URL is read through a data cache "
                                 "(train.data_cache); pass one")
            limit = int(cache.limit_gb * 2**30)
            self._shards = ShardCache(self.folder, cache_dir, limit, verify_shard, cache.ahead)
            self._index = ShardCache(self.folder, cache_dir, limit, verify_index, 1)

    @property
    def local(self) -> bool:
        return self.folder.local is not None

    def view(self) -> Path | None:
        """The training view's local file (`clip_index.view_bytes`), or None when the folder has none (curated
        before it existed): in place, or a copy checked against the sha256 the verified index records for it."""
        if self._index is None:
            path = Path(self.root) / INDEX_VIEW
            return path if path.is_file() else None
        expected = (pq.read_schema(self.index()).metadata or {}).get(b"show1.view_sha256", b"").decode()
        if not expected:
            return None
        if self._view is None:
            self._view = ShardCache(self.folder, self._index.cache_dir, self._index.limit_bytes,
                                    lambda path: _has_sha256(path, expected), 1)
        return self._view.path(INDEX_VIEW)

    def index(self) -> Path:
        """The index's local file: in place, or a verified copy held until `close()`."""
        if self._index is None:
            return index_path(self.root)
        try:
            return self._index.path(INDEX_PARQUET)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.folder.name(INDEX_PARQUET)} not found: run `show1 curate MANIFEST --out "
                                    f"{self.folder}` first") from None

    @contextlib.contextmanager
    def shard(self, name: str) -> Iterator[Path]:
        """`with files.shard(name) as path:` the shard's local file for the block (a cached copy is not evicted)."""
        if self._shards is None:
            path = Path(self.root) / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in the index is missing")
            yield path
            return
        with self._shards.open(name) as path:
            yield path

    def prefetch(self, names: Iterable[str]) -> None:
        """Start fetching these shards ahead of their use (nothing to do for a local folder)."""
        if self._shards is not None:
            self._shards.prefetch(names)

    def close(self) -> None:
        for cache in (self._shards, self._index, self._view):
            if cache is not None:
                cache.close()
