"""Nested training state (optimizer and LR-schedule state dicts, RNG states) without pickle.

`save(tree, folder, name)` writes `name.safetensors` (every tensor) and `name.json` (the structure: dicts,
lists, tuples, numbers, strings, with each tensor replaced by a reference); `load` rebuilds the same tree,
bit for bit. Nothing in either file can run code when it is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from show1 import atomic

_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors):06d}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(value, dict):
        if not all(isinstance(k, str | int) and not isinstance(k, bool) for k in value):
            raise TypeError(f"{path}: dict keys must be str or int")
        return {_DICT: [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{path}: a {type(value).__name__} cannot be stored as training state (tensors, numbers, "
                    "strings, lists, tuples and dicts only)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _TUPLE in value:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        if _DICT in value:
            return {k: _decode(v, tensors) for k, v in value[_DICT]}
        raise ValueError(f"unknown node {sorted(value)}")
    return value


def save(tree: Any, folder: Path | str, name: str) -> None:
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors, name)
    with atomic.atomic_path(folder / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic.write_text(folder / f"{name}.json", json.dumps(structure) + "\n")


def exists(folder: Path | str, name: str) -> bool:
    return (Path(folder) / f"{name}.json").is_file() and (Path(folder) / f"{name}.safetensors").is_file()


def load(folder: Path | str, name: str) -> Any:
    folder = Path(folder)
    try:
        structure = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        return _decode(structure, load_file(str(folder / f"{name}.safetensors")))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ValueError(f"{folder / name}.json/.safetensors: unreadable training state ({exc})") from None
