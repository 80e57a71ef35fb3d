"""The text encoder's outputs for captions, stored once (`show1 embed`) and read by training instead of the encoder.

STORE/<encoder key>/                 one store per text encoder; STORE is CURATED/embeddings unless told otherwise.
                                     The key is the content hash of the encoder folder's files (weights, config,
                                     tokenizer), so a changed encoder makes a new store and never reads stale ones.
  store.json                         format, encoder key and folder, dim, max_length, dtype, batch size
  parts/part-000000.safetensors      many captions per file: `tokens` (T, D), the real tokens of its captions one
                                     after another (bf16 or fp16); `offsets` (k+1,) where each caption starts;
                                     `keys` (k, 32) uint8, the sha256 of each caption's UTF-8 text
  index/keys.npy                     the sha256 of every stored caption, sorted: (N,) |S32
  index/where.npy                    (N, 3) int64 for each key: part number, first token row, token count
  index/parts.json                   the parts the index holds
  covered.json                       sha256 of the curated indexes (index.parquet) whose captions are all stored

Only real tokens are kept, with their count: a WebVid caption is ~20 of T5's 77 tokens, so ~0.16 MB per caption for
T5-XXL in bf16 instead of 0.63 MB padded. A reader opens the index memory-mapped and finds a caption by binary search
(log N pages touched), then reads its rows from its part with one positioned read: a process's resident memory does
not grow with the number of stored captions.

Writing is atomic and resumable: a part is written whole (a temporary renamed into place), then the index is rebuilt
(a staging folder renamed into place) from the previous index and the parts it does not hold yet. A killed run
leaves at worst parts the index does not name yet; the next writer folds them in, so nothing is embedded twice.
A damaged part is refused with its name; once it is removed, the next writer indexes the parts that are left and
embeds its captions anew. One writer at a time (a lock file in the store).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from show1 import atomic
from show1.provenance import folder_files, tree_digest
from show1.weight_files import DamagedWeightsError, check_safetensors

FORMAT = "show1-text-embeddings-v1"
FOLDER = "embeddings"  # beside the clips: CURATED/embeddings/<encoder key>/
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}
PART_BYTES = 256 << 20  # token bytes per part file: ~1,700 T5-XXL captions, ~30,000 of the tiny encoder's
INFO, COVERED, PARTS, INDEX, LOCK = "store.json", "covered.json", "parts", "index", ".lock"
KEEP_COVERED = 64  # the newest curated indexes remembered in covered.json


class StoreError(ValueError):
    """A store that cannot be used as asked (another dtype, a damaged file); the message says what to do."""


def default_root(data_dir: Path | str) -> Path:
    """Where the stores of a curated folder live when nobody says otherwise: beside its clips."""
    return Path(data_dir) / FOLDER


def encoder_key(encoder_dir: Path | str) -> str:
    """The content hash (sha256) of a text encoder folder's files: the name of its store. Reads every file (the
    tiny encoder's 90 MB in a fraction of a second; T5-XXL's ~20 GB in tens of seconds)."""
    folder = Path(encoder_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: text encoder folder not found")
    return tree_digest(folder_files(folder))


def caption_keys(captions: Iterable[str]) -> np.ndarray:
    """The sha256 of each caption's UTF-8 text, as an (N,) |S32 array (what the index sorts and searches)."""
    digests = [hashlib.sha256(caption.encode("utf-8")).digest() for caption in captions]
    return np.array(digests, dtype="S32") if digests else np.empty(0, dtype="S32")


@dataclass(frozen=True)
class StoreInfo:
    """What made a store's numbers: the encoder (key and the folder it was read from), its width and context
    length, the stored dtype, and the batch size it ran at (a batch's shape can change the last bits)."""

    encoder_key: str
    encoder: str
    dim: int
    max_length: int
    dtype: str
    batch_size: int
    format: str = FORMAT

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_info(folder: Path) -> StoreInfo | None:
    """The store.json of `folder`, or None when there is no store there."""
    path = Path(folder) / INFO
    if not path.is_file():
        return None
    try:
        info = StoreInfo(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise StoreError(f"{path}: not a show1 embedding store ({exc}); remove {folder} and run show1 embed") from None
    if info.format != FORMAT or info.dtype not in DTYPES:
        raise StoreError(f"{path}: format {info.format!r}, dtype {info.dtype!r}: not one this show1 reads; remove "
                         f"{folder} and run show1 embed")
    return info


class EmbeddingStore:
    """A store opened for reading: `tokens(caption)` is its real tokens' embeddings (n, D) in the stored dtype."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        info = read_info(self.folder)
        if info is None:
            raise StoreError(f"{self.folder}: no {INFO}, so not an embedding store (run show1 embed)")
        self.info = info
        self.keys, self.where = np.empty(0, dtype="S32"), np.empty((0, 3), dtype=np.int64)  # no part finished yet
        index = self.folder / INDEX
        for _ in range(3):  # a writer may put a new index in place between the two opens: open both again
            if not (index / "keys.npy").is_file():
                break
            self.keys = np.load(index / "keys.npy", mmap_mode="r")  # memory-mapped: nothing read until searched
            self.where = np.load(index / "where.npy", mmap_mode="r")
            if len(self.keys) == len(self.where):  # every rebuild adds keys: equal lengths are one index
                break
        else:
            raise StoreError(f"{index}: keys.npy and where.npy disagree; remove {index} and run show1 embed again")
        self._parts: dict[int, tuple[Path, int]] = {}  # part number -> (file, byte where its tokens start)

    @classmethod
    def find(cls, root: Path | str, key: str) -> EmbeddingStore | None:
        """The store of the encoder `key` under `root`, or None when there is none."""
        folder = Path(root) / key
        return cls(folder) if (folder / INFO).is_file() else None

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """The index row of each key, -1 where the store does not hold it."""
        if not len(self.keys):
            return np.full(len(keys), -1)
        found = np.searchsorted(self.keys, keys)
        inside = found < len(self.keys)
        hit = np.zeros(len(keys), dtype=bool)
        hit[inside] = self.keys[found[inside]] == keys[inside]
        return np.where(hit, found, -1)

    def missing(self, captions: list[str]) -> list[str]:
        """The captions the store does not hold, in their order."""
        absent = self.positions(caption_keys(captions)) < 0
        return [caption for caption, gone in zip(captions, absent, strict=True) if gone]

    def covers(self, curated_digest: str) -> bool:
        """Whether `show1 embed` stored every caption of the curated index with this sha256."""
        path = self.folder / COVERED
        return path.is_file() and curated_digest in json.loads(path.read_text()).get("indexes", [])

    def tokens(self, caption: str) -> torch.Tensor:
        """The caption's real tokens (n, D), in the stored dtype; KeyError naming the store when it is not there."""
        row = int(self.positions(caption_keys([caption]))[0])
        if row < 0:
            raise KeyError(f"caption {caption[:60]!r} is not in {self.folder}: run show1 embed on the curated folder")
        part, first, count = (int(v) for v in self.where[row])
        path, start = self._part(part)
        width = self.info.dim * self.info.torch_dtype.itemsize
        fd = os.open(path, os.O_RDONLY)  # one positioned read, nothing mapped: memory stays flat however long it runs
        try:
            data = os.pread(fd, count * width, start + first * width)
        finally:
            os.close(fd)
        if len(data) != count * width:
            raise StoreError(f"{path}: truncated (caption rows {first}-{first + count} missing); remove it and run "
                             "show1 embed again (its captions are embedded anew)")
        return torch.frombuffer(bytearray(data), dtype=self.info.torch_dtype).view(count, self.info.dim)

    def _part(self, number: int) -> tuple[Path, int]:
        known = self._parts.get(number)
        if known is None:
            path = self.folder / PARTS / part_name(number)
            try:
                check_safetensors(path, doing="read")
            except (FileNotFoundError, DamagedWeightsError) as exc:
                raise StoreError(f"{exc}; remove it and run show1 embed again (its captions are embedded anew)"
                                 ) from None
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
            tokens = header["tokens"]
            if SAFETENSORS_DTYPES.get(tokens["dtype"]) != self.info.torch_dtype or tokens["shape"][1:] != [
                    self.info.dim]:
                raise StoreError(f"{path}: tokens {tokens['dtype']} {tokens['shape']} do not match {INFO} "
                                 f"({self.info.dtype}, dim {self.info.dim}); remove it and run show1 embed again")
            known = self._parts[number] = (path, 8 + length + tokens["data_offsets"][0])
        return known


def part_name(number: int) -> str:
    return f"part-{number:06d}.safetensors"


def _part_number(name: str) -> int:
    return int(name.removeprefix("part-").removesuffix(".safetensors"))


class StoreWriter:
    """Adds captions to a store: `add` buffers them, a part is written each PART_BYTES, `close` rebuilds the index.
    Open it with `StoreWriter.open(folder)` (a context manager holding the store's lock); `start(info)` before the
    first `add`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.info = read_info(folder)
        self._buffer: list[tuple[bytes, torch.Tensor]] = []
        self._buffered = 0
        self._written: list[str] = []

    @classmethod
    @contextlib.contextmanager
    def open(cls, folder: Path | str) -> Iterator[StoreWriter]:
        """Lock the store, clear what a killed writer left, fold its finished parts into the index; yield the
        writer; on a clean exit write the last part and the index."""
        folder = Path(folder)
        (folder / PARTS).mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK, "a") as lock:  # "a": a rerun that stores nothing leaves every file as it was
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"{folder} is being written by another show1 embed") from None
            atomic.remove_stale_temporaries(folder / PARTS)
            atomic.remove_stale_folders(folder)
            writer = cls(folder)
            on_disk = {p.name for p in (folder / PARTS).glob("part-*.safetensors")}
            if not set(writer._indexed()) <= on_disk:  # a damaged part was removed: index the parts that are there
                writer._index(sorted(on_disk), fresh=True)
            elif orphans := sorted(on_disk - set(writer._indexed())):  # parts a killed run wrote
                writer._index(orphans)
            yield writer
            writer.finish()

    def start(self, info: StoreInfo) -> None:
        """Write store.json for a new store, or check that `info` makes the same numbers as the existing one."""
        if self.info is None:
            atomic.write_json(self.folder / INFO, asdict(info))
            self.info = info
            return
        for field in ("encoder_key", "dim", "max_length", "dtype"):
            held, asked = getattr(self.info, field), getattr(info, field)
            if held != asked:
                raise StoreError(f"{self.folder} holds {field} {held!r}, not {asked!r}: remove the folder and run "
                                 "show1 embed again")

    def missing(self, captions: list[str]) -> list[str]:
        """The captions the store does not hold yet, in their order."""
        return EmbeddingStore(self.folder).missing(captions) if self.info is not None else list(captions)

    def add(self, caption: str, tokens: torch.Tensor) -> None:
        """Store `caption`'s real tokens (n, D): rounded to the store's dtype, written with the next part."""
        if self.info is None:
            raise RuntimeError("StoreWriter.start(info) before add")
        if tokens.ndim != 2 or tokens.shape[1] != self.info.dim:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)}, the store holds (n, {self.info.dim})")
        tokens = tokens.detach().to("cpu", self.info.torch_dtype).contiguous()
        self._buffer.append((hashlib.sha256(caption.encode("utf-8")).digest(), tokens))
        self._buffered += tokens.numel() * tokens.element_size()
        if self._buffered >= PART_BYTES:
            self._flush()

    def mark_covered(self, curated_digest: str) -> None:
        """Record that every caption of the curated index with this sha256 is stored (written only if new)."""
        path = self.folder / COVERED
        known = json.loads(path.read_text()).get("indexes", []) if path.is_file() else []
        if curated_digest not in known:
            atomic.write_json(path, {"indexes": [*known, curated_digest][-KEEP_COVERED:]})

    def _flush(self) -> None:
        if not self._buffer:
            return
        existing = [_part_number(p.name) for p in (self.folder / PARTS).glob("part-*.safetensors")]
        name = part_name(max(existing, default=-1) + 1)
        counts = [t.shape[0] for _, t in self._buffer]
        offsets = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.int64)
        keys = torch.frombuffer(bytearray(b"".join(k for k, _ in self._buffer)), dtype=torch.uint8).view(-1, 32)
        tensors = {"tokens": torch.cat([t for _, t in self._buffer]), "offsets": offsets, "keys": keys}
        with atomic.atomic_path(self.folder / PARTS / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "encoder_key": self.info.encoder_key})
        self._written.append(name)
        self._buffer, self._buffered = [], 0

    def finish(self) -> None:
        """Write the buffered captions as a part and rebuild the index with every part written so far."""
        self._flush()
        if self._written:
            self._index(self._written)
            self._written = []

    def _indexed(self) -> list[str]:
        path = self.folder / INDEX / "parts.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def _index(self, new_parts: list[str], fresh: bool = False) -> None:
        """Rebuild index/ from the current one (unless `fresh`) and `new_parts`, sorted by key (a key stored twice
        keeps its first place)."""
        index = self.folder / INDEX
        keys = [np.load(index / "keys.npy")] if (index / "keys.npy").is_file() and not fresh else []
        where = [np.load(index / "where.npy")] if keys else []
        for name in new_parts:
            part_keys, offsets = _part_keys(self.folder / PARTS / name)
            keys.append(part_keys)
            where.append(np.stack([np.full(len(part_keys), _part_number(name)), offsets[:-1], np.diff(offsets)],
                                  axis=1).astype(np.int64))
        all_keys = np.concatenate(keys) if keys else np.empty(0, dtype="S32")
        all_where = np.concatenate(where) if where else np.empty((0, 3), dtype=np.int64)
        order = np.argsort(all_keys, kind="stable")
        all_keys, all_where = all_keys[order], all_where[order]
        first = np.ones(len(all_keys), dtype=bool)
        first[1:] = all_keys[1:] != all_keys[:-1]
        with atomic.folder_in_place(index) as staging:
            _save_npy(staging / "keys.npy", all_keys[first])
            _save_npy(staging / "where.npy", all_where[first])
            atomic.write_json(staging / "parts.json", sorted({*([] if fresh else self._indexed()), *new_parts}))


def _part_keys(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A part's caption keys (k,) |S32 and token offsets (k+1,)."""
    try:
        check_safetensors(path, doing="index")
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("format") != FORMAT:
                raise StoreError(f"{path}: not a show1 embedding part; remove it and run show1 embed again")
            keys = handle.get_tensor("keys").numpy()
            offsets = handle.get_tensor("offsets").numpy()
    except DamagedWeightsError as exc:
        raise StoreError(f"{exc}; remove it and run show1 embed again") from None
    return np.ascontiguousarray(keys).view("S32").reshape(-1), offsets


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
        handle.flush()
        os.fsync(handle.fileno())
