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
    """A weight file show1 refuses to load (a pickle); the message says how to convert it."""


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
    """Everything show1 checks before loading weights from `folder`: no pickles, and its seal (required when
    `sealed`) matches, for the whole folder or only the component folders in `parts` (plus its top-level files).
    Returns the content hash when the folder is sealed."""
    folder = Path(folder)
    for part in parts if parts is not None else [""]:
        if (folder / part).is_dir():
            refuse_pickles(folder / part)
    return integrity.verify(folder, required=sealed, parts=parts)


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
    counts = {"converted": 0, "copied": 0, "skipped": 0}
    with atomic.folder_in_place(out) as staging:
        for path in sorted(source.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.name == integrity.CHECKSUMS:
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
                _write_safetensors(load_pickle_safely(path), target.with_name(safetensors_name(path.name)))
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
                counts["copied"] += 1
        integrity.seal(staging)
    return counts
