"""Models of the cascade: the Show-1 pixel UNet3D and its stage configurations."""

from show1.models.unet_3d_condition import ShowOneUNet3DConditionModel, UNet3DConditionOutput

__all__ = ["ShowOneUNet3DConditionModel", "UNet3DConditionOutput"]
