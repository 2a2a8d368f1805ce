"""The UNet's levels: down blocks, the mid block and up blocks, built from a UNetConfig.

All three are lists of ResnetBlock2D, each optionally followed by a Transformer2DModel; they differ
only in what happens around that list (skip outputs, skip inputs, resampling), so the list itself
is built and run by the shared helpers below.
"""

import mlx.core as mx
import mlx.nn as nn

from .attention import Transformer2DModel
from ..configs.unet import UNetConfig
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


def _transformers(config: UNetConfig, channels: int, heads: int, depths: tuple[int, ...]) -> list:
    return [
        Transformer2DModel(
            channels,
            heads,
            depth,
            context_dim=config.cross_attention_dim,
            groups=config.norm_num_groups,
            linear_projection=config.use_linear_projection,
            upcast=config.upcast_attention,
        )
        for depth in depths
    ]


def _resnet(config: UNetConfig, in_channels: int, out_channels: int, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels, out_channels, config.time_embed_dim, config.norm_num_groups, config.norm_eps, scale
    )


def _layer(block: nn.Module, i: int, x: mx.array, temb_silu: mx.array, text_kv: list) -> mx.array:
    """Resnet ``i`` of ``block``, then its transformer if the block has attention."""
    x = block.resnets[i](x, temb_silu)
    if block.attentions:
        x = block.attentions[i](x, text_kv[i])
    return x


def _cross_attention_kv(block: nn.Module, context: mx.array) -> list:
    """Per transformer of ``block`` (none without attention), its blocks' text keys and values."""
    return [attention.cross_attention_kv(context) for attention in block.attentions]


class DownBlock(nn.Module):
    """DownBlock2D, or CrossAttnDownBlock2D when ``with_attention``."""

    def __init__(self, config: UNetConfig, level: int, in_channels: int, with_attention: bool):
        super().__init__()
        out = config.block_out_channels[level]
        layers = config.layers_per_block[level]
        self.resnets = [_resnet(config, in_channels if i == 0 else out, out) for i in range(layers)]
        self.attentions = (
            _transformers(config, out, config.num_attention_heads[level], config.transformer_depths[level])
            if with_attention
            else []
        )
        is_last = level == config.num_levels - 1
        self.downsamplers = [] if is_last else [Downsample2D(out, config.downsample_padding)]

    cross_attention_kv = _cross_attention_kv

    def __call__(self, x, temb_silu, text_kv) -> tuple[mx.array, list[mx.array]]:
        """Returns the output and the skip activations the matching up block will consume.
        ``text_kv`` (here and in the other blocks): what ``cross_attention_kv`` made of the text."""
        skips = []
        for i in range(len(self.resnets)):
            x = _layer(self, i, x, temb_silu, text_kv)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: a resnet, then (transformer, resnet) pairs."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        channels = config.block_out_channels[-1]
        scale = config.mid_block_scale_factor
        self.resnets = [_resnet(config, channels, channels, scale) for _ in range(2)]
        self.attentions = _transformers(
            config, channels, config.num_attention_heads[-1], (config.mid_transformer_depth,)
        )

    cross_attention_kv = _cross_attention_kv

    def __call__(self, x, temb_silu, text_kv) -> mx.array:
        x = self.resnets[0](x, temb_silu)
        return self.resnets[1](self.attentions[0](x, text_kv[0]), temb_silu)


class UpBlock(nn.Module):
    """UpBlock2D, or CrossAttnUpBlock2D when ``with_attention``.

    ``index`` counts up blocks from the bottom of the UNet. Resnet ``i`` takes the previous output
    concatenated (on channels, after it) with one skip activation, consumed last-in first-out.
    """

    def __init__(self, config: UNetConfig, index: int, prev_channels: int, with_attention: bool):
        super().__init__()
        levels = config.num_levels
        channels = tuple(reversed(config.block_out_channels))
        out = channels[index]
        # The last skip of this level comes from the level above (or conv_in for the top level).
        skip_in = channels[min(index + 1, levels - 1)]
        layers = len(config.up_transformer_depths[index])
        self.resnets = [
            _resnet(
                config,
                (prev_channels if i == 0 else out) + (skip_in if i == layers - 1 else out),
                out,
            )
            for i in range(layers)
        ]
        heads = tuple(reversed(config.num_attention_heads))[index]
        self.attentions = (
            _transformers(config, out, heads, config.up_transformer_depths[index]) if with_attention else []
        )
        is_last = index == levels - 1
        self.upsamplers = [] if is_last else [Upsample2D(out)]

    cross_attention_kv = _cross_attention_kv

    def __call__(self, x, temb_silu, text_kv, skips: list[mx.array],
                 upsample_size: tuple[int, int] | None = None) -> mx.array:
        for i in range(len(self.resnets)):
            x = mx.concatenate([x, skips.pop()], axis=-1)
            x = _layer(self, i, x, temb_silu, text_kv)
        for upsampler in self.upsamplers:
            x = upsampler(x, upsample_size)
        return x
