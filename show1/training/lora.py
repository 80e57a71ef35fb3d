"""LoRA fine-tuning (`train.lora`): adapters of the `peft` library (what diffusers uses) on the frozen UNet of a
trained stage, and the adapter folder a LoRA run writes instead of a stage folder.

The trainer adds the adapters after loading the `--init-from` stage (`add_adapter`): every UNet weight is frozen and
each targeted linear layer W becomes W + (alpha / rank) · B·A, B starting at zero (the run starts from the base's
outputs). The optimizer, gradient clipping and the EMA see the adapter weights only (`trained_parameters`), so
AdamW's moments and the EMA copy are the adapter's size, not the UNet's. Checkpoints hold what exact resume needs and
no UNet copy: the base comes from `--init-from` again, checked against the one the run started from (`base.json`).

RUN_DIR/checkpoints/step-N/  adapter/ (training weights), ema.safetensors (the adapter's EMA), training state,
                             state.json, base.json, checksums.json
RUN_DIR/final/               adapter/adapter_model.safetensors (EMA weights, peft's key names) and
                             adapter/adapter_config.json (peft's LoraConfig), base.json, checksums.json

base.json names the stage folder the adapter was trained on: `stage`, `source` (the --init-from given), `folder`
(where it was), `folder_hash` (its seal's content hash, None for an unsealed folder) and `content_hash` (its content
hash as registration computes it, when it is a registered version; otherwise `show1 register` computes it from
`folder`). Registration finds the base's version by it; a cascade loaded from the registry merges the adapter into
its base's weights at load time (`merge_adapter_folder`).

Not with FSDP (`check_setup` refuses `train.fsdp` or an FSDP accelerate config with `train.lora`). What FSDP saves
is mostly gradients and AdamW state, and LoRA already shrinks those to the adapter's (the paper's base UNet: 2.5 M of
1.7 G parameters, AdamW state 19 MiB instead of 12.9 GiB); the frozen weights it would still shard fit one GPU. And
show1's sharded gather, restore and export move the UNet by its plain state dict, whose names the injected adapter
layers change: sharding a LoRA run would need LoRA-aware versions of them, for little memory.
Data-parallel processes (torchrun, `accelerate launch --multi_gpu`) work as for full training.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from show1 import integrity
from show1.config import Lora

if TYPE_CHECKING:
    import torch

ADAPTER = "adapter"  # the adapter's folder in a checkpoint, final/ and a registered version's stage folder
BASE_FILE = "base.json"
WEIGHTS = "adapter_model.safetensors"  # peft's file names
CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"


def check_setup(lora: Lora | None, init_from: Any, sharded: bool) -> None:
    """Refuse what LoRA training cannot do, before anything is loaded."""
    if lora is None:
        return
    if init_from is None:
        raise ValueError("train.lora trains adapters on a trained stage: pass --init-from (its stage folder, or "
                         "models:/NAME@ALIAS), also when resuming; adapters on random weights would learn nothing "
                         "a later model can reuse")
    if sharded:
        raise ValueError("train.lora with train.fsdp (or an FSDP accelerate config) is not supported: LoRA already "
                         "shrinks the gradients and optimizer state FSDP would shard to the small adapter's, and the "
                         "frozen UNet fits one GPU; train LoRA data-parallel instead (torchrun or `accelerate launch "
                         "--multi_gpu`, train.fsdp: false)")


def lora_config(lora: Lora) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, target_modules=list(lora.target_modules),
                      lora_dropout=lora.dropout, init_lora_weights=True)  # True: B = 0, the base's outputs at first


def add_adapter(unet: torch.nn.Module, lora: Lora, config: Any = None) -> list[torch.nn.Parameter]:
    """Freeze `unet` and inject LoRA layers (peft) into it in place; return the adapter's parameters (the trainable
    ones, in module order). A target name that matches no layer of this UNet is an error naming the layers it has."""
    import torch
    from peft import inject_adapter_in_model

    unet.requires_grad_(False)
    try:
        inject_adapter_in_model(config or lora_config(lora), unet, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        names = sorted({name.rsplit(".", 1)[-1] for name, module in unet.named_modules()
                        if isinstance(module, torch.nn.Linear)})
        raise ValueError(f"train.lora.target_modules {lora.target_modules}: no layer of this "
                         f"{type(unet).__name__} matches (its linear layers end in: {', '.join(names)})") from None
    return trainable(unet)


def trainable(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in unet.parameters() if param.requires_grad]


def trained_parameters(unet: torch.nn.Module, lora: Lora | None) -> list[torch.nn.Parameter]:
    """What the optimizer steps and the EMA averages: the adapter's parameters with LoRA, else every parameter."""
    return trainable(unet) if lora is not None else list(unet.parameters())


def has_adapter(unet: torch.nn.Module) -> bool:
    return hasattr(unet, "peft_config")


def adapter_weights(unet: torch.nn.Module, weights: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (`….to_q.lora_A.weight`): the live ones, or `weights` (e.g. the EMA
    weights) given in `trainable(unet)` order."""
    from peft import get_peft_model_state_dict

    names = [name for name, param in unet.named_parameters() if param.requires_grad]
    values = weights if weights is not None else trainable(unet)
    state = dict(zip(names, (value.detach() for value in values), strict=True))
    return {name: tensor.cpu().contiguous() for name, tensor in
            get_peft_model_state_dict(unet, state_dict=state, adapter_name=ADAPTER_NAME).items()}


def save_adapter(unet: torch.nn.Module, folder: Path, weights: list[torch.Tensor] | None = None) -> Path:
    """Write `folder` (adapter_model.safetensors and adapter_config.json, peft's format) with the live adapter
    weights or `weights` (in `trainable(unet)` order)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_weights(unet, weights), str(folder / WEIGHTS))
    unet.peft_config[ADAPTER_NAME].save_pretrained(str(folder))
    # peft writes target_modules from a set, in an order that changes with each process's string hashing: sorted,
    # the same adapter is the same bytes (registration is idempotent by content hash).
    config = json.loads((folder / CONFIG).read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def read_adapter(folder: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(LoraConfig, weights) of an adapter folder."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    adapter_settings(folder)
    return LoraConfig.from_pretrained(str(folder)), load_file(str(folder / WEIGHTS))


def adapter_settings(folder: Path) -> dict[str, Any]:
    """adapter_config.json of an adapter folder (read without torch or peft), which must hold the weights too."""
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}, so not a LoRA adapter folder")
    try:
        settings = json.loads((folder / CONFIG).read_text())
    except ValueError as exc:
        raise ValueError(f"{folder / CONFIG}: not valid JSON ({exc})") from None
    if settings.get("peft_type") != "LORA" or not isinstance(settings.get("r"), int):
        raise ValueError(f"{folder / CONFIG}: not a LoRA adapter's config (peft_type LORA, r)")
    return settings


def load_adapter(unet: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter weights (peft's names) into the adapter injected in `unet`; every tensor must fit."""
    from peft import set_peft_model_state_dict

    expected = adapter_weights(unet)
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = [name for name in expected.keys() & weights.keys() if expected[name].shape != weights[name].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not fit this UNet's adapter (train.lora): missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {wrong[:3]}")
    set_peft_model_state_dict(unet, weights, adapter_name=ADAPTER_NAME)


def merge(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold every injected adapter into its layer's weight (W + scale · B·A, peft's merge) and put the plain layers
    back: the result is an ordinary UNet of its class, loadable and savable as any other."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        for name, module in list(unet.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[ADAPTER_NAME])
                parent, _, child = name.rpartition(".")
                setattr(unet.get_submodule(parent), child, module.get_base_layer())
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(unet, attribute):
            delattr(unet, attribute)
    return unet


def merged_copy(unet: torch.nn.Module, weights: list[torch.Tensor]) -> torch.nn.Module:
    """A plain UNet: a copy of `unet` (base and adapter) with `weights` as the adapter (the EMA, in
    `trainable(unet)` order), merged. The training model is left as it is."""
    import torch

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        twin = copy.deepcopy(unet)
        for param, value in zip(trainable(twin), weights, strict=True):
            param.copy_(value)
    return merge(twin)


def apply_adapter(unet: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """`unet` (a plain UNet: the base) with the adapter in `folder` merged into its weights."""
    import torch

    config, weights = read_adapter(folder)
    with torch.random.fork_rng(devices=[]):  # the adapter's random initialisation is overwritten: draw nothing
        add_adapter(unet, Lora(rank=config.r, alpha=config.lora_alpha, target_modules=sorted(config.target_modules),
                               dropout=config.lora_dropout), config)
    load_adapter(unet, weights, str(folder / WEIGHTS))
    return merge(unet)


def _link_or_copy(src: str, dst: str) -> None:
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge_adapter_folder(stage: str, base: Path, adapter: Path, target: Path) -> Path:
    """Write `target`: the stage folder `base` with its UNet replaced by the UNet with the adapter folder `adapter`
    merged in, sealed (every loader of stage folders loads it unchanged). Base files other than the UNet's are
    hard-linked where the filesystem allows (a cache's files are never changed in place), else copied."""
    import shutil

    from diffusers import UNet3DConditionModel

    from show1.models.unet_3d_condition import ShowOneUNet3DConditionModel
    from show1.training.specs import SPECS

    target.mkdir(parents=True)
    for item in sorted(base.iterdir()):
        if item.name in ("unet", integrity.CHECKSUMS):
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(item), str(target / item.name))
    # By stage, as the trainer loads it: a published pixel folder's unet/config.json names its class
    # UNet3DConditionModel too.
    kind = UNet3DConditionModel if SPECS[stage].latent else ShowOneUNet3DConditionModel
    unet = kind.from_pretrained(base / "unet", use_safetensors=True)
    apply_adapter(unet, adapter).save_pretrained(target / "unet", safe_serialization=True)
    integrity.seal(target)
    return target


# --- base.json ----------------------------------------------------------------------------------------------------


def base_record(stage: str, folder: Path, reference: str, content_hash: str | None) -> dict[str, Any]:
    """What base.json says of the stage folder a LoRA run adapts (its seal was checked when the UNet was loaded)."""
    seal = integrity.read_seal(Path(folder))
    return {"stage": stage, "source": str(reference), "folder": str(Path(folder).resolve()),
            "folder_hash": seal.get("content_hash") if seal else None, "content_hash": content_hash or None}


def write_base(folder: Path, record: dict[str, Any]) -> None:
    (folder / BASE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))


def read_base(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / BASE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder / BASE_FILE}: unreadable ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("stage"), str):
        raise ValueError(f"{folder / BASE_FILE}: not a base record (no stage)")
    return record


def is_adapter_folder(folder: Path) -> bool:
    """A LoRA run's final/ or checkpoint (or a registered adapter version's stage folder)."""
    return (Path(folder) / BASE_FILE).is_file() and (Path(folder) / ADAPTER).is_dir()


def check_same_base(checkpoint: Path, record: dict[str, Any]) -> None:
    """A LoRA run resumes on the base it started from: refuse another --init-from."""
    saved = read_base(checkpoint)
    for key in ("content_hash", "folder_hash"):
        if saved.get(key) and record.get(key) and saved[key] != record[key]:
            raise ValueError(f"{checkpoint.name} adapts {saved.get('source')} ({key} {saved[key][:12]}…), but "
                             f"--init-from {record['source']} is another stage folder ({record[key][:12]}…): "
                             "resume with the base the run started from")
