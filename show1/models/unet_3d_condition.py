"""The Show-1 pixel UNet3D: DeepFloyd IF's UNet with frames folded into the batch and temporal layers.

Config keys and state-dict names match the published `show-1-*/unet` checkpoints (including the
reference's `transfromer_in_opt` spelling), so `from_pretrained(<show-1-base>/unet)` loads them with no
missing or unexpected keys. Input and output are `(batch, channels, frames, height, width)`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.embeddings import TextTimeEmbedding, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.utils import BaseOutput
from torch import nn

from show1.models.unet_3d_blocks import DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS


class UNet3DConditionOutput(BaseOutput):
    sample: torch.Tensor


def _per_block(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} down blocks")
        return list(value)
    return [value] * count


def _unsupported(name: str, value: Any, supported: tuple[Any, ...]) -> None:
    if value not in supported:
        raise NotImplementedError(f"{name}={value!r} is not used by Show-1 and not supported (supported: {supported})")


class ShowOneUNet3DConditionModel(ModelMixin, ConfigMixin):
    """Show-1's `showone.models.unet_3d_condition.UNet3DConditionModel`, rebuilt from diffusers' blocks."""

    _supports_gradient_checkpointing = True
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 3,
        out_channels: int = 6,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D",
                                             "SimpleCrossAttnDownBlock3D", "SimpleCrossAttnDownBlock3D"),
        mid_block_type: str | None = "UNetMidBlock3DSimpleCrossAttn",
        up_block_types: tuple[str, ...] = ("SimpleCrossAttnUpBlock3D", "SimpleCrossAttnUpBlock3D",
                                           "SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 960, 1280),
        layers_per_block: int | tuple[int, ...] = 3,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "gelu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int, ...] = 1280,
        transformer_layers_per_block: int = 1,
        encoder_hid_dim: int | None = 4096,
        encoder_hid_dim_type: str | None = "text_proj",
        attention_head_dim: int | tuple[int, ...] = 64,
        num_attention_heads: int | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = "text",
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "scale_shift",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = "group_norm",
        addition_embed_type_num_heads: int = 64,
        transfromer_in_opt: bool = False,  # sic: the published configs spell it this way
    ):
        super().__init__()
        _unsupported("time_embedding_type", time_embedding_type, ("positional",))
        _unsupported("class_embed_type", class_embed_type, (None, "timestep"))
        _unsupported("addition_embed_type", addition_embed_type, (None, "text"))
        _unsupported("encoder_hid_dim_type", encoder_hid_dim_type if encoder_hid_dim is not None else None,
                     (None, "text_proj"))
        _unsupported("num_attention_heads", num_attention_heads, (None,))
        if len(down_block_types) != len(up_block_types) or len(down_block_types) != len(block_out_channels):
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
        blocks = len(down_block_types)
        only_cross = _per_block(only_cross_attention, blocks, "only_cross_attention")
        head_dims = _per_block(attention_head_dim, blocks, "attention_head_dim")
        cross_dims = _per_block(cross_attention_dim, blocks, "cross_attention_dim")
        layers = _per_block(layers_per_block, blocks, "layers_per_block")
        if mid_block_only_cross_attention is None:
            mid_block_only_cross_attention = only_cross_attention if isinstance(only_cross_attention, bool) else False

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=conv_in_kernel,
                                 padding=(conv_in_kernel - 1) // 2)
        self.transformer_in = TransformerTemporalModel(
            num_attention_heads=8, attention_head_dim=64, in_channels=block_out_channels[0], num_layers=1,
        ) if transfromer_in_opt else None

        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn,
                                                post_act_fn=timestep_post_act, cond_proj_dim=time_cond_proj_dim)
        self.encoder_hid_proj = nn.Linear(encoder_hid_dim, cross_dims[0]) if encoder_hid_dim is not None else None
        self.class_embedding = (TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)
                                if class_embed_type == "timestep" else None)
        self.add_embedding = TextTimeEmbedding(
            encoder_hid_dim if encoder_hid_dim is not None else cross_dims[0], time_embed_dim,
            num_heads=addition_embed_type_num_heads) if addition_embed_type == "text" else None
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn else None
        temb_channels = time_embed_dim * 2 if class_embeddings_concat else time_embed_dim

        common = {"temb_channels": temb_channels, "resnet_eps": norm_eps, "resnet_act_fn": act_fn,
                  "resnet_groups": norm_num_groups, "resnet_time_scale_shift": resnet_time_scale_shift,
                  "skip_time_act": resnet_skip_time_act, "output_scale_factor": resnet_out_scale_factor}
        # Registered before the mid block, as in the reference, so the state dict has its order.
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        output_channel = block_out_channels[0]
        for i, name in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            kwargs = dict(common, in_channels=input_channel, out_channels=output_channel, num_layers=layers[i],
                          add_downsample=i < blocks - 1)
            if name == "SimpleCrossAttnDownBlock3D":
                kwargs |= {"attention_head_dim": head_dims[i] or output_channel, "cross_attention_dim": cross_dims[i],
                           "only_cross_attention": only_cross[i], "cross_attention_norm": cross_attention_norm,
                           "norm_num_groups": norm_num_groups}
            self.down_blocks.append(self._block(DOWN_BLOCKS, name, "down_block_types", kwargs))

        if mid_block_type is None:
            self.mid_block = None
        else:
            mid = dict(common, in_channels=block_out_channels[-1], output_scale_factor=mid_block_scale_factor,
                       cross_attention_dim=cross_dims[-1], attention_head_dim=head_dims[-1],
                       only_cross_attention=mid_block_only_cross_attention, cross_attention_norm=cross_attention_norm)
            self.mid_block = self._block(MID_BLOCKS, mid_block_type, "mid_block_type", mid)

        self.num_upsamplers = 0
        reversed_channels = list(reversed(block_out_channels))
        reversed_layers, reversed_cross = list(reversed(layers)), list(reversed(cross_dims))
        reversed_only_cross = list(reversed(only_cross))
        output_channel = reversed_channels[0]
        for i, name in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            add_upsample = i < blocks - 1
            self.num_upsamplers += int(add_upsample)
            kwargs = dict(common, in_channels=reversed_channels[min(i + 1, blocks - 1)], out_channels=output_channel,
                          prev_output_channel=prev_output_channel, num_layers=reversed_layers[i] + 1,
                          add_upsample=add_upsample)
            if name == "SimpleCrossAttnUpBlock3D":
                # The reference indexes attention_head_dim forwards here (not reversed); kept for parity.
                kwargs |= {"attention_head_dim": head_dims[i] or output_channel,
                           "cross_attention_dim": reversed_cross[i], "only_cross_attention": reversed_only_cross[i],
                           "cross_attention_norm": cross_attention_norm, "norm_num_groups": norm_num_groups}
            self.up_blocks.append(self._block(UP_BLOCKS, name, "up_block_types", kwargs))

        if norm_num_groups is not None:
            self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups,
                                              eps=norm_eps)
            self.conv_act = get_activation(act_fn)
        else:
            self.conv_norm_out, self.conv_act = None, None
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=conv_out_kernel,
                                  padding=(conv_out_kernel - 1) // 2)

    @staticmethod
    def _block(table: dict[str, type[nn.Module]], name: str, key: str, kwargs: dict[str, Any]) -> nn.Module:
        if name not in table:
            raise ValueError(f"{key}: unknown block '{name}' (known: {', '.join(table)})")
        return table[name](**kwargs)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet3DConditionOutput | tuple[torch.Tensor]:
        """Denoise `sample` (B, C, F, H, W) at `timestep` given text embeddings (B, L, D)."""
        batch, _, num_frames, height, width = sample.shape
        if sample.dim() != 5:
            raise ValueError(f"sample must be (batch, channels, frames, height, width), got {tuple(sample.shape)}")
        factor = 2 ** self.num_upsamplers
        forward_upsample_size = height % factor != 0 or width % factor != 0
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.dim() == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(batch)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype), timestep_cond)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet has a class embedding (the noise level): pass class_labels")
            class_labels = self.time_proj(class_labels).to(dtype=sample.dtype)
            class_emb = self.class_embedding(class_labels).to(dtype=sample.dtype)
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(encoder_hidden_states)  # the raw text embeddings, before the projection
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)

        # Fold frames into the batch: every spatial layer sees images, every temporal layer unfolds them.
        emb = emb.repeat_interleave(num_frames, dim=0)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)
        sample = sample.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, -1, height, width)
        sample = self.conv_in(sample)
        if self.transformer_in is not None:
            sample = self.transformer_in(sample, num_frames=num_frames, cross_attention_kwargs=cross_attention_kwargs,
                                         return_dict=False)[0]

        context = {"encoder_hidden_states": encoder_hidden_states, "attention_mask": attention_mask,
                   "cross_attention_kwargs": cross_attention_kwargs, "encoder_attention_mask": encoder_attention_mask}
        residuals: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            extra = context if getattr(block, "has_cross_attention", False) else {}
            sample, res = block(hidden_states=sample, temb=emb, num_frames=num_frames, **extra)
            residuals += res
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, num_frames=num_frames, **context)
        upsample_size = None
        for i, block in enumerate(self.up_blocks):
            res = residuals[-len(block.resnets):]
            residuals = residuals[:-len(block.resnets)]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = residuals[-1].shape[2:]
            extra = context if getattr(block, "has_cross_attention", False) else {}
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size,
                           num_frames=num_frames, **extra)
        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)
        sample = sample.reshape(batch, num_frames, *sample.shape[1:]).permute(0, 2, 1, 3, 4)
        return UNet3DConditionOutput(sample=sample) if return_dict else (sample,)

    # ------------------------------------------------------------------------------------------- inflation

    @classmethod
    def config_from_2d(cls, config_2d: dict[str, Any]) -> dict[str, Any]:
        """The 3D config of an IF-style 2D UNet config: block names "…2D" become "…3D"."""
        config = {k: v for k, v in dict(config_2d).items() if not k.startswith("_")}
        config["down_block_types"] = [b.replace("2D", "3D") for b in config["down_block_types"]]
        config["up_block_types"] = [b.replace("2D", "3D") for b in config["up_block_types"]]
        if config.get("mid_block_type"):
            config["mid_block_type"] = config["mid_block_type"].replace("2D", "3D")
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        dropped = sorted(set(config) - known - {"transfromer_in_opt"})
        unsupported = [k for k in dropped if config_2d.get(k) not in (None, False, 1, "default")]
        if unsupported:
            raise ValueError(f"2D UNet config keys the Show-1 UNet cannot represent: {unsupported}")
        return {k: v for k, v in config.items() if k in known}

    @classmethod
    def from_2d(cls, unet_2d: UNet2DConditionModel | str | Path) -> ShowOneUNet3DConditionModel:
        """Inflate an IF-style `UNet2DConditionModel` (a model or a folder holding one).

        Spatial weights are copied 1:1. Temporal convs start as the identity (their last conv is zero) and
        temporal attentions start with a zero output projection, so the 3D model is exactly the 2D model
        applied to every frame.
        """
        if not isinstance(unet_2d, UNet2DConditionModel):
            unet_2d = UNet2DConditionModel.from_pretrained(str(unet_2d), use_safetensors=True)
        model = cls.from_config(cls.config_from_2d(unet_2d.config))
        missing, unexpected = model.load_state_dict(unet_2d.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"2D weights with no place in the 3D model: {unexpected[:5]}")
        not_temporal = [k for k in missing if ".temp_" not in k and not k.startswith("transformer_in.")]
        if not_temporal:
            raise ValueError(f"spatial weights missing from the 2D model: {not_temporal[:5]}")
        model.zero_temporal_attention_outputs()
        return model if unet_2d.dtype == model.dtype else model.to(dtype=unet_2d.dtype)

    def zero_temporal_attention_outputs(self) -> None:
        """Make every temporal attention an identity (zero `proj_out`), for a per-frame start."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, TransformerTemporalModel):
                    nn.init.zeros_(module.proj_out.weight)
                    nn.init.zeros_(module.proj_out.bias)
