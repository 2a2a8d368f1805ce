"""The models' sizes from their configs alone, before anything is built: parameter counts, and
bytes in a dtype with the quantization policy's layers quantized (``mlx_unet.quantize``). The
tests check both against built models, for every family and setting."""

from __future__ import annotations

from functools import cache

from ..configs.clip import CLIPTextConfig
from ..configs.quantization import Quantization
from ..configs.unet import UNetConfig
from ..configs.vae import VAEConfig
from ..quantize import ATTENTION, EMBEDDINGS, FEED_FORWARD, PROJECTIONS, TEXT, dense_groups


def _conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k + cout


def _linear(cin: int, cout: int, bias: bool = True) -> int:
    return cin * cout + (cout if bias else 0)


def _resnet(cin: int, cout: int, temb: int | None) -> int:
    """models.resnet.ResnetBlock2D: two norms, two 3x3 convolutions, time projection, shortcut."""
    shortcut = _conv(cin, cout, 1) if cin != cout else 0
    return 2 * cin + _conv(cin, cout) + (_linear(temb, cout) if temb else 0) + 2 * cout + _conv(cout, cout) + shortcut


def _transformer(c: int, depth: int, context: int) -> int:
    """models.attention.Transformer2DModel: norm, projections and ``depth`` transformer blocks."""
    block = 6 * c + 4 * c * c + c + 2 * c * c + 2 * context * c + c + _linear(c, 8 * c) + _linear(4 * c, c)
    return 2 * c + 2 * _linear(c, c) + depth * block


@cache
def unet_parameters(c: UNetConfig) -> int:
    """The parameter count of ``UNet2DConditionModel(c)``, from its config alone (building the
    model would draw its random initial weights from MLX's global generator)."""
    ch, temb = c.block_out_channels, c.time_embed_dim
    n = _conv(c.in_channels, ch[0], c.conv_in_kernel) + _linear(ch[0], temb) + _linear(temb, temb)
    if c.has_text_time_embedding:
        n += _linear(c.projection_class_embeddings_input_dim, temb) + _linear(temb, temb)
    for level, kind in enumerate(c.down_block_types):
        cin = ch[max(level - 1, 0)]
        for i in range(c.layers_per_block[level]):
            n += _resnet(cin if i == 0 else ch[level], ch[level], temb)
        if kind == "CrossAttnDownBlock2D":
            n += sum(_transformer(ch[level], d, c.cross_attention_dim) for d in c.transformer_depths[level])
        n += _conv(ch[level], ch[level]) if level < c.num_levels - 1 else 0
    if c.mid_block_type is not None:
        n += 2 * _resnet(ch[-1], ch[-1], temb) + _transformer(ch[-1], c.mid_transformer_depth, c.cross_attention_dim)
    up, prev = tuple(reversed(ch)), ch[-1]
    for index, kind in enumerate(c.up_block_types):
        depths, out, skip = c.up_transformer_depths[index], up[index], up[min(index + 1, c.num_levels - 1)]
        for i in range(len(depths)):
            n += _resnet((prev if i == 0 else out) + (skip if i == len(depths) - 1 else out), out, temb)
        if kind == "CrossAttnUpBlock2D":
            n += sum(_transformer(out, d, c.cross_attention_dim) for d in depths)
        n += _conv(out, out) if index < c.num_levels - 1 else 0
        prev = out
    return n + 2 * ch[0] + _conv(ch[0], c.out_channels, c.conv_out_kernel)


@cache
def vae_parameters(c: VAEConfig) -> int:
    """The parameter count of ``AutoencoderKL(c)`` (encoder and decoder: both are loaded)."""
    ch, lat, last = c.block_out_channels, c.latent_channels, len(c.block_out_channels) - 1
    mid = 2 * _resnet(ch[-1], ch[-1], None) + (2 * ch[-1] + 4 * _linear(ch[-1], ch[-1]) if c.mid_block_add_attention else 0)
    n = _conv(c.in_channels, ch[0]) + mid + 2 * ch[-1] + _conv(ch[-1], 2 * lat)  # encoder
    for i in range(len(ch)):
        n += sum(_resnet(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], None) for j in range(c.layers_per_block))
        n += _conv(ch[i], ch[i]) if i < last else 0
    up = tuple(reversed(ch))
    n += _conv(lat, up[0]) + mid + 2 * up[-1] + _conv(up[-1], c.out_channels)  # decoder
    for i in range(len(up)):
        n += sum(_resnet(up[max(i - 1, 0)] if j == 0 else up[i], up[i], None) for j in range(c.layers_per_block + 1))
        n += _conv(up[i], up[i]) if i < last else 0
    return n + (_conv(2 * lat, 2 * lat, 1) if c.use_quant_conv else 0) + (_conv(lat, lat, 1) if c.use_post_quant_conv else 0)


@cache
def text_encoder_parameters(c: CLIPTextConfig) -> int:
    """The parameter count of ``CLIPTextModel(c)``."""
    h = c.hidden_size
    layer = 4 * h + 4 * _linear(h, h) + _linear(h, c.intermediate_size) + _linear(c.intermediate_size, h)
    n = text_embedding_parameters(c) + c.num_hidden_layers * layer + 2 * h
    return n + (_linear(h, c.projection_dim, bias=False) if c.with_projection else 0)


def text_embedding_parameters(c: CLIPTextConfig) -> int:
    """The parameter count of the token and position embeddings of ``CLIPTextModel(c)``."""
    return (c.vocab_size + c.max_position_embeddings) * c.hidden_size


# The Linear weights, for the quantized bytes.


def _unet_linears(c: UNetConfig) -> list[tuple[str, int, int]]:
    """(group, in, out) of every Linear weight of ``UNet2DConditionModel(c)`` (quantize.py's groups)."""
    temb, ch = c.time_embed_dim, c.block_out_channels
    layers = [(EMBEDDINGS, ch[0], temb), (EMBEDDINGS, temb, temb)]
    if c.has_text_time_embedding:
        layers += [(EMBEDDINGS, c.projection_class_embeddings_input_dim, temb), (EMBEDDINGS, temb, temb)]

    def transformers(width: int, depths) -> None:
        for depth in depths:
            if c.use_linear_projection:
                layers.extend([(PROJECTIONS, width, width)] * 2)
            block = [(ATTENTION, width, width)] * 5 + [(ATTENTION, c.cross_attention_dim, width)] * 2 + \
                [(ATTENTION, width, width), (FEED_FORWARD, width, 8 * width), (FEED_FORWARD, 4 * width, width)]
            layers.extend(block * depth)

    up = tuple(reversed(ch))
    for level, kind in enumerate(c.down_block_types):
        layers += [(EMBEDDINGS, temb, ch[level])] * c.layers_per_block[level]
        if kind == "CrossAttnDownBlock2D":
            transformers(ch[level], c.transformer_depths[level])
    if c.mid_block_type is not None:
        layers += [(EMBEDDINGS, temb, ch[-1])] * 2
        transformers(ch[-1], [c.mid_transformer_depth])
    for index, kind in enumerate(c.up_block_types):
        depths = c.up_transformer_depths[index]
        layers += [(EMBEDDINGS, temb, up[index])] * len(depths)
        if kind == "CrossAttnUpBlock2D":
            transformers(up[index], depths)
    return layers


def _text_linears(c: CLIPTextConfig) -> list[tuple[str, int, int]]:
    h, inner = c.hidden_size, c.intermediate_size
    layers = ([(TEXT, h, h)] * 4 + [(TEXT, h, inner), (TEXT, inner, h)]) * c.num_hidden_layers
    return layers + ([(TEXT, h, c.projection_dim)] if c.with_projection else [])


def model_bytes(parameters: int, linears: list[tuple[str, int, int]], dtype_size: int,
                quantization: Quantization | None) -> int:
    """Bytes of a model of ``parameters`` parameters in a ``dtype_size``-byte dtype, with the
    Linear weights ``linears`` that the quantization policy takes quantized."""
    if quantization is None:
        return parameters * dtype_size
    dense = dense_groups(quantization)
    quantized = sum(i * o for group, i, o in linears if group not in dense and i % quantization.group_size == 0)
    return int((parameters - quantized) * dtype_size + quantized * quantization.bits_per_weight(dtype_size) / 8)


def unet_bytes(c: UNetConfig, dtype_size: int, quantization: Quantization | None = None) -> int:
    return model_bytes(unet_parameters(c), _unet_linears(c), dtype_size, quantization)


def text_encoder_bytes(c: CLIPTextConfig, dtype_size: int, quantization: Quantization | None = None) -> int:
    return model_bytes(text_encoder_parameters(c), _text_linears(c), dtype_size, quantization)


def largest_linear(c: UNetConfig) -> int:
    """The element count of the UNet's largest Linear weight."""
    return max(i * o for _, i, o in _unet_linears(c))
