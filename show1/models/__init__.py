"""Models of the cascade: the Show-1 pixel UNet3D and its stage configurations.

The model classes load on first use, so `show1.models.configs` (stage names, published defaults) stays light for
commands that never build a model (`show1 promote`, `show1 lineage`): importing diffusers costs seconds."""

from __future__ import annotations

from typing import Any

__all__ = ["ShowOneUNet3DConditionModel", "UNet3DConditionOutput"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from show1.models import unet_3d_condition

        return getattr(unet_3d_condition, name)
    raise AttributeError(f"module 'show1.models' has no attribute {name!r}")
