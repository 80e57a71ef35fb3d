"""The Show-1 UNet's "3D" blocks: diffusers' IF-style 2D blocks with a temporal layer after each spatial one.

Frames are folded into the batch (`(b f) c h w`). After every `ResnetBlock2D` comes a
`TemporalConvLayer` (dropout 0.1, last conv zero-initialised, so it starts as the identity) and after every
spatial `Attention` a `TransformerTemporalModel` (attention over frames at each pixel, no positional
embedding). The spatial parts are diffusers' own 2D blocks, constructed exactly as IF's, so their weights
and state-dict names are shared with the 2D model; this module adds only the temporal layers and the
forward passes that interleave them, in the order of the reference implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.resnet import TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from diffusers.models.unets.unet_2d_blocks import (
    ResnetDownsampleBlock2D,
    ResnetUpsampleBlock2D,
    SimpleCrossAttnDownBlock2D,
    SimpleCrossAttnUpBlock2D,
    UNetMidBlock2DSimpleCrossAttn,
)
from torch import nn

TEMPORAL_CONV_DROPOUT = 0.1


def _temporal_conv(channels: int) -> TemporalConvLayer:
    # The reference keeps diffusers' default of 32 norm groups here, whatever the UNet's norm_num_groups.
    return TemporalConvLayer(channels, channels, dropout=TEMPORAL_CONV_DROPOUT)


def _temporal_attention(channels: int, attention_head_dim: int, cross_attention_dim: int,
                        norm_num_groups: int) -> TransformerTemporalModel:
    # The reference passes (attention_head_dim, channels // attention_head_dim) positionally, i.e. as
    # (num_attention_heads, attention_head_dim): heads and head size are swapped. Shapes are unaffected,
    # the computation is not, so it is reproduced here.
    return TransformerTemporalModel(
        num_attention_heads=attention_head_dim, attention_head_dim=channels // attention_head_dim,
        in_channels=channels, num_layers=1, cross_attention_dim=cross_attention_dim,
        norm_num_groups=norm_num_groups)


class _Temporal(nn.Module):
    """Shared plumbing: registering temporal layers in the reference's state-dict order, checkpointing."""

    gradient_checkpointing: bool = False

    def _order_modules(self, *names: str) -> None:
        """Re-register submodules in the order of the reference's state dict."""
        modules = self._modules
        ordered = {name: modules[name] for name in names if name in modules}
        ordered |= {name: module for name, module in modules.items() if name not in ordered}
        modules.clear()
        modules.update(ordered)

    def _add_temporal(self, conv_channels: list[int], attention_channels: list[int] = (),
                      cross_attention_dim: int = 1280, norm_num_groups: int = 32) -> None:
        """A temporal conv per resnet, a temporal attention per spatial attention, in the reference's order."""
        self.temp_convs = nn.ModuleList([_temporal_conv(c) for c in conv_channels])
        if attention_channels:
            self.temp_attentions = nn.ModuleList([
                _temporal_attention(c, self.attention_head_dim, cross_attention_dim, norm_num_groups)
                for c in attention_channels])
        self._order_modules("resnets", "temp_convs", "attentions", "temp_attentions", "downsamplers", "upsamplers")

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.training and self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _temporal_attn(self, layer: TransformerTemporalModel, hidden_states: torch.Tensor, num_frames: int,
                       cross_attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
        return layer(hidden_states, num_frames=num_frames, cross_attention_kwargs=cross_attention_kwargs,
                     return_dict=False)[0]

    def _attend(self, attn: nn.Module, temp_attn: TransformerTemporalModel, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None, mask: torch.Tensor | None, num_frames: int,
                cross_attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
        kwargs = cross_attention_kwargs or {}
        hidden_states = self._run(
            lambda h, e, m: attn(h, encoder_hidden_states=e, attention_mask=m, **kwargs),
            hidden_states, encoder_hidden_states, mask)
        return self._run(lambda h: self._temporal_attn(temp_attn, h, num_frames, cross_attention_kwargs),
                         hidden_states)

    def _resample(self, samplers: nn.ModuleList | None, hidden_states: torch.Tensor,
                  temb: torch.Tensor | None) -> torch.Tensor:
        """The down/upsampling resnets at the end of a block (none in the last/first block)."""
        for sampler in samplers or ():
            hidden_states = self._run(sampler, hidden_states, temb)
        return hidden_states

    def _resnet(self, resnet: nn.Module, temp_conv: TemporalConvLayer, hidden_states: torch.Tensor,
                temb: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        hidden_states = self._run(resnet, hidden_states, temb)
        return self._run(lambda h: temp_conv(h, num_frames=num_frames), hidden_states)


def _mask(attention_mask: torch.Tensor | None, encoder_hidden_states: torch.Tensor | None,
          encoder_attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None:
        return None if encoder_hidden_states is None else encoder_attention_mask
    return attention_mask


class ResnetDownsampleBlock3D(ResnetDownsampleBlock2D, _Temporal):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._add_temporal([r.out_channels for r in self.resnets])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, num_frames: int = 1,
                **_: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        output_states: tuple[torch.Tensor, ...] = ()
        for resnet, temp_conv in zip(self.resnets, self.temp_convs, strict=True):
            hidden_states = self._resnet(resnet, temp_conv, hidden_states, temb, num_frames)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self._resample(self.downsamplers, hidden_states, temb)
            output_states += (hidden_states,)
        return hidden_states, output_states


class SimpleCrossAttnDownBlock3D(SimpleCrossAttnDownBlock2D, _Temporal):
    def __init__(self, *args: Any, norm_num_groups: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        channels = [r.out_channels for r in self.resnets]
        self._add_temporal(channels, channels, kwargs.get("cross_attention_dim", 1280), norm_num_groups)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                num_frames: int = 1, cross_attention_kwargs: dict[str, Any] | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        mask = _mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        output_states: tuple[torch.Tensor, ...] = ()
        for resnet, temp_conv, attn, temp_attn in zip(
                self.resnets, self.temp_convs, self.attentions, self.temp_attentions, strict=True):
            hidden_states = self._resnet(resnet, temp_conv, hidden_states, temb, num_frames)
            hidden_states = self._attend(attn, temp_attn, hidden_states, encoder_hidden_states, mask, num_frames,
                                         cross_attention_kwargs)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self._resample(self.downsamplers, hidden_states, temb)
            output_states += (hidden_states,)
        return hidden_states, output_states


class UNetMidBlock3DSimpleCrossAttn(UNetMidBlock2DSimpleCrossAttn, _Temporal):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        channels = kwargs["in_channels"]
        self.gradient_checkpointing = False
        self._add_temporal([channels] * len(self.resnets), [channels] * len(self.attentions),
                           kwargs.get("cross_attention_dim", 1280), kwargs.get("resnet_groups", 32))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                num_frames: int = 1, cross_attention_kwargs: dict[str, Any] | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        hidden_states = self._resnet(self.resnets[0], self.temp_convs[0], hidden_states, temb, num_frames)
        for attn, temp_attn, resnet, temp_conv in zip(
                self.attentions, self.temp_attentions, self.resnets[1:], self.temp_convs[1:], strict=True):
            hidden_states = self._attend(attn, temp_attn, hidden_states, encoder_hidden_states, mask, num_frames,
                                         cross_attention_kwargs)
            hidden_states = self._resnet(resnet, temp_conv, hidden_states, temb, num_frames)
        return hidden_states


class ResnetUpsampleBlock3D(ResnetUpsampleBlock2D, _Temporal):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._add_temporal([r.out_channels for r in self.resnets])

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, upsample_size: int | None = None, num_frames: int = 1,
                **_: Any) -> torch.Tensor:
        for resnet, temp_conv in zip(self.resnets, self.temp_convs, strict=True):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = self._resnet(resnet, temp_conv, hidden_states, temb, num_frames)
        return self._resample(self.upsamplers, hidden_states, temb)


class SimpleCrossAttnUpBlock3D(SimpleCrossAttnUpBlock2D, _Temporal):
    def __init__(self, *args: Any, norm_num_groups: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        channels = [r.out_channels for r in self.resnets]
        self._add_temporal(channels, channels, kwargs.get("cross_attention_dim", 1280), norm_num_groups)

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                upsample_size: int | None = None, num_frames: int = 1, attention_mask: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        for resnet, temp_conv, attn, temp_attn in zip(
                self.resnets, self.temp_convs, self.attentions, self.temp_attentions, strict=True):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = self._resnet(resnet, temp_conv, hidden_states, temb, num_frames)
            hidden_states = self._attend(attn, temp_attn, hidden_states, encoder_hidden_states, mask, num_frames,
                                         cross_attention_kwargs)
        return self._resample(self.upsamplers, hidden_states, temb)


DOWN_BLOCKS = {"ResnetDownsampleBlock3D": ResnetDownsampleBlock3D,
               "SimpleCrossAttnDownBlock3D": SimpleCrossAttnDownBlock3D}
UP_BLOCKS = {"ResnetUpsampleBlock3D": ResnetUpsampleBlock3D, "SimpleCrossAttnUpBlock3D": SimpleCrossAttnUpBlock3D}
MID_BLOCKS = {"UNetMidBlock3DSimpleCrossAttn": UNetMidBlock3DSimpleCrossAttn}
