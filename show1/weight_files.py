"""Weight files show1 will load: safetensors only.

A pickled weight file (`.bin`, `.pt`, `.ckpt`, …) can run arbitrary code the moment it is unpickled, so show1
never loads one: every `from_pretrained` is called with `use_safetensors=True`, and a folder whose weights exist
only as pickles is refused with the command that converts it. `convert_folder` (`show1 convert-weights`) reads
each pickle once with `torch.load(weights_only=True)` (tensors and plain containers only; a pickle that asks
for anything else is refused) and writes safetensors in the names diffusers and transformers look for.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from show1 import atomic, integrity

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
# Pickles a Hugging Face Trainer leaves beside weights: never loaded by from_pretrained, never converted.
TRAINER_STATE = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")


def is_weight_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES and not TRAINER_STATE.match(path.name)
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5}-of-\d{5})$")


class MissingComponentError(FileNotFoundError):
    """A model folder lacks a component its pipeline needs; the message names it."""


class UnsafeWeightsError(ValueError):
    """A weight file show1 refuses to load (a pickle), or a link out of a folder being converted; the message
    says what to do."""


class DamagedWeightsError(UnsafeWeightsError):
    """A safetensors file whose header does not match the file (truncated, damaged, not safetensors); the message
    names the file and what is wrong."""


# ----------------------------------------------------------------------------------------- safetensors headers

# Bits per element of each safetensors dtype (the format's own list; F4/F6 pack several elements per byte).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
SAFETENSORS_MAX_HEADER = 100_000_000  # what the safetensors library accepts


def safetensors_problem(head: bytes, file_size: int) -> str | None:
    """What is wrong with a safetensors file, judged from its first bytes (the 8-byte little-endian header length
    and the JSON header, as far as the file has them) and its size in bytes; None when the header is valid JSON
    and every tensor's dtype × shape fills exactly its byte range, the ranges tiling the data section, which ends
    where the file ends. Reads no tensor data, so it is as cheap for 20 GB as for 20 kB."""
    if file_size < 8 or len(head) < 8:
        return f"truncated: {file_size} bytes, too short for the 8-byte header length"
    length = int.from_bytes(head[:8], "little")
    if length > SAFETENSORS_MAX_HEADER:
        return f"header length {length} is beyond the {SAFETENSORS_MAX_HEADER}-byte limit of the format"
    if 8 + length > file_size or len(head) < 8 + length:
        return f"truncated: its header is {length} bytes long but the file has {file_size} bytes in all"
    try:
        header = json.loads(head[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"its header is not JSON: {exc}"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        return "its __metadata__ is not a table of strings"
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            return f"tensor {name!r}: expected dtype, shape and data_offsets in the header"
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPE_BITS:
            return f"tensor {name!r}: unknown dtype {dtype!r}"
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return f"tensor {name!r}: shape {shape!r} is not a list of sizes"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"
        elements = 1
        for size in shape:
            elements *= size
        bits = elements * SAFETENSORS_DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            return (f"tensor {name!r}: {dtype} × {shape} is {bits / 8:g} bytes but its data_offsets span "
                    f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            return (f"tensor {name!r} starts at byte {begin} of the data, expected {end}: "
                    f"{'it overlaps the tensor before it' if begin < end else 'there is a gap before it'}")
        end = stop
    data = file_size - 8 - length
    if end > data:
        return f"truncated: its tensors need {end} bytes of data, the file holds {data}"
    if end < data:
        return f"{data - end} stray bytes after the last tensor"
    return None


def check_safetensors(path: Path | str, shown: Path | str | None = None, doing: str = "load") -> None:
    """Raise `DamagedWeightsError` naming `shown` (default `path`) unless the header of the safetensors file at
    `path` matches the file (see `safetensors_problem`); `doing` is what is refused. Reads the header only."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) == 8 and int.from_bytes(head, "little") <= min(size - 8, SAFETENSORS_MAX_HEADER):
            head += handle.read(int.from_bytes(head, "little"))
    problem = safetensors_problem(head, size)
    if problem:
        raise DamagedWeightsError(f"{shown or path}: damaged safetensors file ({problem}); refusing to {doing} "
                                  "it: replace it with a whole copy")


def check_safetensors_files(folder: Path | str, recursive: bool = True) -> None:
    """`check_safetensors` for every `.safetensors` file in `folder` (and below, when `recursive`)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*.safetensors") if recursive else folder.glob("*.safetensors")):
        if path.is_file() and not path.name.startswith(atomic.TMP_MARK):
            check_safetensors(path)


def pickled_weights(folder: Path) -> list[Path]:
    """Pickle weight files in `folder` (recursively) that have no safetensors beside them."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and is_weight_pickle(path) and not any(path.parent.glob("*.safetensors")):
            found.append(path)
    return found


def refuse_pickles(folder: Path | str) -> None:
    """Raise `UnsafeWeightsError` when a component of `folder` has its weights only as pickles."""
    folder = Path(folder)
    pickles = pickled_weights(folder)
    if pickles:
        raise UnsafeWeightsError(
            f"{pickles[0]}: pickled weights{f' (and {len(pickles) - 1} more)' if len(pickles) > 1 else ''}. "
            "show1 loads safetensors only, because a pickle can run code when it is loaded. Convert the folder "
            f"once (tensors only, torch.load(weights_only=True)): show1 convert-weights {folder} --out "
            f"{folder.with_name(folder.name + '-safetensors')}")


def check_folder(folder: Path | str, sealed: bool = False, parts: list[str] | None = None) -> str | None:
    """Everything show1 checks before loading weights from `folder`: no pickles, its seal (required when
    `sealed`) matches, and every safetensors header matches its file (an unsealed folder, e.g. published weights,
    has only this check against truncation), for the whole folder or only the component folders in `parts` (plus
    its top-level files). Returns the content hash when the folder is sealed."""
    folder = Path(folder)
    roots = [folder / part for part in (parts if parts is not None else [""]) if (folder / part).is_dir()]
    for root in roots:
        refuse_pickles(root)
    # The seal first: a sealed file that changed is named as such (training's resume hint relies on it).
    content_hash = integrity.verify(folder, required=sealed, parts=parts)
    for root in roots:
        check_safetensors_files(root)
    if parts is not None and folder.is_dir():
        check_safetensors_files(folder, recursive=False)
    return content_hash


def check_parts(folder: Path | str, parts: tuple[str, ...], what: str) -> Path:
    """`folder` (named `what` in errors) holds model_index.json and the component folders `parts`, as safetensors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder}: folder not found (it needs model_index.json, "
                                f"{', '.join(f'{p}/' for p in parts)})")
    for name in ("model_index.json", *parts):
        if not (folder / name).exists():
            raise MissingComponentError(f"{what} {folder}: missing '{name}' (it needs model_index.json, "
                                        f"{', '.join(f'{p}/' for p in parts)})")
    check_folder(folder, parts=list(parts))
    return folder


# ----------------------------------------------------------------------------------------------- conversion


def safetensors_name(name: str) -> str:
    """The safetensors file name diffusers/transformers look for in place of a pickle (shards keep their index)."""
    stem = Path(name).stem
    shard = _SHARD.match(stem)
    base, suffix = (shard["stem"], f"-{shard['index']}") if shard else (stem, "")
    return f"{'model' if base == 'pytorch_model' else base}{suffix}.safetensors"


def _index_name(name: str) -> str:
    """`pytorch_model.bin.index.json` → `model.safetensors.index.json` (diffusers' names keep their stem)."""
    weights = name[: -len(".index.json")]
    return f"{safetensors_name(weights)}.index.json"


def load_pickle_safely(path: Path) -> dict:
    """Tensors of a pickled state dict, unpickled with `weights_only=True`; anything else is refused."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("\n\n")[-1].strip().splitlines()[0] if str(exc) else "not a tensors-only pickle"
        raise UnsafeWeightsError(f"{path}: refused, it is not a tensors-only pickle ({reason})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise UnsafeWeightsError(f"{path}: not a readable torch weight file ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in state.items()):
        raise UnsafeWeightsError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def _write_safetensors(state: dict, target: Path) -> None:
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        shared = key in seen or (tensor.numel() and tensor.untyped_storage().nbytes() > tensor.nbytes)
        seen.add(key)
        tensors[name] = tensor.clone().contiguous() if shared else tensor.contiguous()
    with atomic.atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def source_files(source: Path) -> list[Path]:
    """The files under `source` to copy, in order, as paths inside it. A symbolic link (to a file or a folder)
    is followed only while it stays inside `source`: one that points out of it, nowhere, or at a folder that
    holds it is refused, so a conversion never copies (and seals) a file from elsewhere."""
    root = source.resolve()
    found: list[Path] = []

    def walk(folder: Path, above: frozenset[Path]) -> None:
        for path in sorted(folder.iterdir()):
            if path.is_symlink():
                try:
                    target = path.resolve()
                except (RuntimeError, OSError):  # a link to itself, or a cycle of links
                    raise UnsafeWeightsError(f"{path}: a symbolic link that loops onto itself") from None
                if target != root and root not in target.parents:
                    raise UnsafeWeightsError(
                        f"{path}: a symbolic link to {target}, outside {source}; refusing to copy what it points "
                        f"to. Put the file itself in the folder (or convert the folder it points into)")
                if not target.exists():
                    raise UnsafeWeightsError(f"{path}: a symbolic link to {target}, which does not exist")
                if target in above:
                    raise UnsafeWeightsError(f"{path}: a symbolic link to {target}, a folder that holds it (a loop)")
            if path.is_dir():
                walk(path, above | {path.resolve()})
            elif path.is_file():
                found.append(path)

    walk(source, frozenset({root}))
    return found


def convert_folder(source: Path | str, out: Path | str, overwrite: bool = False,
                   on_file: Callable[[Path], None] | None = None) -> dict[str, int]:
    """Copy `source` to `out` with every pickled weight file converted to safetensors, then seal `out`.

    Returns counts: converted, copied, skipped (pickles that already had safetensors beside them, and a
    Trainer's own state such as training_args.bin, which is not weights)."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: folder not found")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} must be outside {source}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    files = source_files(source)
    for path in files:  # before anything is written: a damaged file leaves no --out behind
        if path.suffix == ".safetensors":
            check_safetensors(path, doing="convert")
    counts = {"converted": 0, "copied": 0, "skipped": 0}
    with atomic.folder_in_place(out) as staging:
        for path in files:
            if "__pycache__" in path.parts or path.name == integrity.CHECKSUMS:
                continue
            relative = path.relative_to(source)
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            has_safetensors = any(path.parent.glob("*.safetensors"))
            if path.suffix.lower() in PICKLE_SUFFIXES:
                if has_safetensors or not is_weight_pickle(path):
                    counts["skipped"] += 1
                    continue
                if on_file is not None:
                    on_file(relative)
                written = target.with_name(safetensors_name(path.name))
                _write_safetensors(load_pickle_safely(path), written)
                check_safetensors(written, shown=path, doing="convert")
                counts["converted"] += 1
            elif path.name.endswith(".index.json") and Path(path.name[: -len(".index.json")]).suffix in PICKLE_SUFFIXES:
                if has_safetensors:
                    counts["skipped"] += 1
                    continue
                index = json.loads(path.read_text())
                index["weight_map"] = {k: safetensors_name(v) for k, v in index.get("weight_map", {}).items()}
                atomic.write_json(target.with_name(_index_name(path.name)), index)
                counts["converted"] += 1
            else:
                shutil.copy2(path, target)
                if target.suffix == ".safetensors":  # what is sealed is the copy: check it, not only the source
                    check_safetensors(target, shown=path, doing="convert")
                counts["copied"] += 1
        integrity.seal(staging)
    return counts
