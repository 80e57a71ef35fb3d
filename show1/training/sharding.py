"""FSDP: the UNet's parameters, gradients and optimizer state sharded over the training processes (torch's FSDP2,
full shard: each process holds 1/N of every block and gathers a block only while it runs).

Who shards:
- `accelerate launch --config_file configs/accelerate/fsdp.yaml` on GPUs: accelerate (its FSDP2 plugin: the
  config's wrap policy, activation checkpointing and mixed precision) when the trainer prepares the UNet.
- `train.fsdp: true` under torchrun, or an FSDP accelerate config where accelerate does not shard (accelerate
  1.15 enables FSDP for GPU-family devices only, so CPU processes on gloo stay MULTI_CPU): `shard()` here, with
  torch's `fully_shard` on each block of the UNet (`FSDP_UNITS`), then on the whole model, and the config's
  activation checkpointing as accelerate applies it (torch's checkpoint wrapper around each block).

Either way the parameters become DTensors and everything after is one code path: the EMA weights are sharded like
the parameters (an element-wise average needs no communication), clipping sees the global gradient norm, and a
checkpoint is the ordinary stage folder and training state: `gather` collects every tensor to the main process on
save (a collective: every process calls it; the others keep nothing), `load_*` scatters the full tensors of a
checkpoint back to each process's shard on restore. So a sharded run resumes unsharded and the other way round,
and `final/` is the same stage folder the pipelines load. Host memory on save: the main process holds the full
weights, EMA weights and AdamW moments (4 × the fp32 parameters, ~28 GB for the paper's base UNet).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

# The blocks that become FSDP units (each gathered only while it runs). Also the UNets' `_no_split_modules`, which
# accelerate's TRANSFORMER_BASED_WRAP policy reads when its config names no classes.
FSDP_UNITS = {
    "ShowOneUNet3DConditionModel": ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D",
                                    "UNetMidBlock3DSimpleCrossAttn", "ResnetUpsampleBlock3D",
                                    "SimpleCrossAttnUpBlock3D"],
    "UNet3DConditionModel": ["CrossAttnDownBlock3D", "DownBlock3D", "UNetMidBlock3DCrossAttn", "CrossAttnUpBlock3D",
                             "UpBlock3D"],
}
CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module."  # in the parameter names of a block wrapped for checkpointing
UNSUPPORTED = ("DEEPSPEED", "MEGATRON_LM")  # accelerate's DistributedType values the trainer does not run under
PARAM_DTYPES = {"no": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Plan:
    """How this run shards: `by` is None (every process holds the whole UNet: one process or DDP), "accelerate"
    (accelerate's FSDP2 plugin shards it when the UNet is prepared) or "show1" (`shard()`)."""

    by: str | None = None
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False  # an accelerate FSDP config's; train.gradient_checkpointing is the same

    @property
    def sharded(self) -> bool:
        return self.by is not None


def plan(fsdp: bool, mixed_precision: str, accelerator: Any) -> Plan:
    """The sharding of a run from `train.fsdp` and accelerate's set-up; refuses what the trainer cannot run."""
    name = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if name in UNSUPPORTED:
        raise ValueError(f"accelerate is configured for {name}: show1's trainer runs one process, data-parallel "
                         "(torchrun, `accelerate launch --multi_gpu`) or sharded with FSDP "
                         "(configs/accelerate/fsdp.yaml, or train.fsdp: true)")
    if name == "FSDP":
        if not accelerator.is_fsdp2:
            raise ValueError("accelerate is configured for FSDP version 1: show1 shards with FSDP2 (DTensor "
                             "parameters); set `fsdp_version: 2` in the accelerate config "
                             "(configs/accelerate/fsdp.yaml)")
        return Plan("accelerate", bool(accelerator.state.fsdp_plugin.reshard_after_forward))
    from_launcher = _env_flag("ACCELERATE_USE_FSDP")  # an FSDP accelerate config on processes accelerate left unsharded
    if not (fsdp or from_launcher):
        return Plan()
    if mixed_precision not in PARAM_DTYPES:
        raise ValueError(f"train.mixed_precision {mixed_precision!r} with FSDP: show1 shards in fp32 ('no') or "
                         "bf16 (fp16 would need a sharded gradient scaler)")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard",
                                                                                  "shard_grad_op")
    return Plan("show1", reshard, _env_flag("FSDP_ACTIVATION_CHECKPOINTING"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def set_units(unet: torch.nn.Module) -> list[str]:
    """Name the UNet's blocks as its FSDP units (`_no_split_modules`, read by accelerate too); returns them."""
    units = FSDP_UNITS.get(plain_class(unet).__name__)
    if units is None:
        raise ValueError(f"no FSDP units are known for a {plain_class(unet).__name__} (known: "
                         f"{', '.join(FSDP_UNITS)})")
    unet._no_split_modules = units
    return units


def shard(unet: torch.nn.Module, mixed_precision: str, reshard_after_forward: bool = True,
          activation_checkpointing: bool = False) -> torch.nn.Module:
    """Shard the UNet in place over every process (torch FSDP2): each block, then the whole model. Parameters are
    kept in fp32 (what the optimizer steps); with bf16 each block computes in bf16 and gradients are reduced in
    fp32. With activation checkpointing each block is wrapped first, as accelerate's FSDP2 does (its parameter
    names then hold `_checkpoint_wrapped_module.`; its state dict does not)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[mixed_precision], reduce_dtype=torch.float32)
    # FSDP2 warns that a block returning a view loses its pre-backward hook if the caller changes that view in place.
    # The UNets never do: a sharded run's gradients and weights equal one process's (tests/test_training_ddp.py).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    units = set(set_units(unet))
    blocks = [(name, module) for name, module in unet.named_modules() if type(module).__name__ in units]
    for name, block in blocks:
        if activation_checkpointing:  # the wrapper recomputes the block in backward, with the same random draws
            block = checkpoint_wrapper(block)
            unet.set_submodule(name, block)
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(unet, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return unet


def plain_class(module: torch.nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass, FSDP<Name>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def share_held(module: torch.nn.Module) -> float:
    """The fraction of the module's parameters this process holds (1.0 unsharded, about 1/N with FSDP)."""
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())
    return held / max(1, sum(p.numel() for p in module.parameters()))


def sync_gradients(unet: torch.nn.Module, sync: bool) -> None:
    """Reduce-scatter the gradients on this backward or not (accumulation micro-steps keep them local)."""
    if hasattr(unet, "set_requires_gradient_sync"):
        unet.set_requires_gradient_sync(sync)


# --- gather on save: every process calls, the main one keeps ------------------------------------------------------


def full(tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The whole tensor on the CPU (an all-gather when it is sharded), or None where it is not kept."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu() if keep else None


def full_tree(value: Any, keep: bool) -> Any:
    """A nested state (an optimizer's state dict) with every sharded tensor gathered."""
    if isinstance(value, torch.Tensor):
        return full(value, keep) if isinstance(value, DTensor) else value
    if isinstance(value, dict):
        return {key: full_tree(item, keep) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(full_tree(item, keep) for item in value)
    return value


@dataclass
class Gathered:
    """What the main process writes: a plain UNet with the training weights, the EMA weights in parameter order,
    and the optimizer's state dict (every tensor whole). `owned`: the UNet is a copy made for this state (sharded
    runs), not the live training model, so a last use may overwrite it."""

    unet: torch.nn.Module
    ema: list[torch.Tensor]
    optimizer: dict[str, Any] | None
    owned: bool = False


def gather(unet: torch.nn.Module, ema_weights: list[torch.Tensor], optimizer: Any, sharded: bool, keep: bool,
           with_optimizer: bool = True) -> Gathered | None:
    """The run's state, whole, on the main process (`keep`); None on the others. Unsharded, the live objects (no
    copy, no communication); sharded, a collective that every process must enter."""
    if not sharded:
        return Gathered(unet, ema_weights, optimizer.state_dict() if with_optimizer else None) if keep else None
    weights = {name: full(value, keep) for name, value in unet.state_dict().items()}
    ema = [full(value, keep) for value in ema_weights]
    state = full_tree(optimizer.state_dict(), keep) if with_optimizer else None
    if not keep:
        return None
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
        plain = plain_class(unet).from_config(unet.config)
    plain.load_state_dict(weights)
    return Gathered(plain, ema, state, owned=True)


# --- scatter on restore: every process reads the whole tensors and keeps its shard ----------------------------------


@torch.no_grad()
def load_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into `target`, or into this process's shard of it."""
    if isinstance(target, DTensor):
        whole = distribute_tensor(whole.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                  target.placements, src_data_rank=None)  # each process has it: no communication
    target.copy_(whole)


def load_weights(unet: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load a whole state dict into a UNet, sharded or not. The names are its state dict's (a block wrapped for
    checkpointing is named as if it were not); every one must be there, with its shape."""
    saved = set(unet.state_dict())  # persistent tensors only, under their unwrapped names
    own = {name: tensor for name, tensor in ((name.replace(CHECKPOINT_WRAPPED, ""), tensor)
                                            for name, tensor in [*unet.named_parameters(), *unet.named_buffers()])
           if name in saved}
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this UNet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in own.items():
        if tensor.shape != weights[name].shape:
            raise ValueError(f"{source}: {name} has shape {tuple(weights[name].shape)}, the UNet's is "
                             f"{tuple(tensor.shape)}")
        load_into(tensor, weights[name])


def load_optimizer(optimizer: Any, state: dict[str, Any]) -> None:
    """Load an optimizer state dict saved whole; the moments of sharded parameters go to their shards."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, values in state["state"].items():
        param = params[index]
        if not isinstance(param, DTensor):
            continue
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                values[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                                src_data_rank=None)
    optimizer.load_state_dict(state)
