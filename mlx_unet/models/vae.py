"""AutoencoderKL: diffusers' VAE (Stable Diffusion, SDXL) in MLX, NHWC, driven by a VAEConfig.

Images are (batch, height, width, 3) in [-1, 1]; latents are (batch, height / 8, width / 8, 4),
unscaled (the sampler multiplies them by ``scaling_factor`` itself; VAEConfig refuses a ``shift_factor``).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..configs.vae import VAEConfig
from ..errors import InputError
from .attention import ScaledDotProductAttention
from .norm import GroupNorm
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

# diffusers' Encoder and Decoder hard-code this eps for every GroupNorm (resnets, attention and
# output norm), whatever the config.
_EPS = 1e-6

# ---------------------------------------------------------------------- modules


def _resnets(in_channels: int, out_channels: int, layers: int, groups: int) -> list[ResnetBlock2D]:
    return [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS)
            for i in range(layers)]


class VAEAttention(nn.Module):
    """diffusers' Attention as the VAE's mid block builds it: GroupNorm first, one head as wide as
    the channels, biased projections, and the input added back.

    diffusers also divides by ``rescale_output_factor``, which the VAE always sets to 1.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, _EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]  # index 0, as in diffusers' ModuleList
        self.attention = ScaledDotProductAttention()
        self.scale = channels**-0.5

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        # One head: (B, 1, tokens, C) is already the (batch, heads, tokens, head_dim) layout.
        tokens = self.group_norm(x).reshape(b, 1, h * w, c)
        out = self.attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), self.scale)
        return x + self.to_out[0](out).reshape(b, h, w, c)


class VAEMidBlock(nn.Module):
    """UNetMidBlock2D as the VAE builds it: a resnet, the attention (unless the config drops it),
    a resnet."""

    def __init__(self, channels: int, groups: int, with_attention: bool):
        super().__init__()
        self.resnets = _resnets(channels, channels, 2, groups)
        self.attentions = [VAEAttention(channels, groups)] if with_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, layers, groups)
        # Padding 0: the VAE pads one row and column at the bottom/right only (the LDM original).
        self.downsamplers = [Downsample2D(out_channels, padding=0)] if downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.downsamplers:
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, layers, groups)
        self.upsamplers = [Upsample2D(out_channels)] if upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.upsamplers:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image -> the latent distribution's moments (mean and log-variance, concatenated)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, i < last)
            for i in range(len(channels))
        ]
        self.mid_block = VAEMidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1], _EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent -> image. Each up level has one resnet more than the encoder's levels (diffusers'
    layers_per_block + 1)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = VAEMidBlock(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, i < last)
            for i in range(len(channels))
        ]
        self.conv_norm_out = GroupNorm(groups, channels[-1], _EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's latent distribution: a normal with diagonal covariance, per latent pixel."""

    def __init__(self, moments: mx.array):
        self.mean, logvar = mx.split(moments, 2, axis=-1)
        # diffusers' clamp: keeps exp() finite for untrained or extreme inputs.
        self.logvar = mx.clip(logvar, -30.0, 20.0)

    @property
    def std(self) -> mx.array:
        return mx.exp(0.5 * self.logvar)

    def sample(self, key: mx.array | None = None) -> mx.array:
        """mean + std * noise, the noise drawn from ``key`` (MLX's global generator if None)."""
        noise = mx.random.normal(self.mean.shape, dtype=self.mean.dtype, key=key)
        return self.mean + self.std * noise

    def mode(self) -> mx.array:
        return self.mean


def _blend(previous: mx.array, tile: mx.array, extent: int, axis: int) -> mx.array:
    """diffusers' blend_v (axis 1) and blend_h (axis 2): the first ``extent`` rows (columns) of
    ``tile`` fade linearly from the last ones of ``previous`` to its own."""
    extent = min(previous.shape[axis], tile.shape[axis], extent)
    if extent == 0:
        return tile
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    # diffusers computes each weight as a Python float, which torch rounds to float32.
    ramp = np.arange(extent) / extent
    w_tile = mx.array(ramp.astype(np.float32)).reshape(shape)
    w_prev = mx.array((1 - ramp).astype(np.float32)).reshape(shape)
    head, rest = mx.split(tile, [extent], axis=axis)
    tail = mx.split(previous, [previous.shape[axis] - extent], axis=axis)[1]
    blended = (tail * w_prev + head * w_tile).astype(tile.dtype)
    return mx.concatenate([blended, rest], axis=axis)


def tile_plan(size, overlap, factor: int) -> tuple[int, int, int, int]:
    """(latent tile size, latent step between tiles, blended pixels, pixels kept per tile) for
    tiles of ``size`` image pixels overlapping by ``overlap``, computed as diffusers does, after
    checking that the kept parts stitch into the full image."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % factor:
        raise InputError(f"tile_sample_size must be a positive multiple of {factor} pixels, got {size!r}.")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise InputError(f"the tile overlap must be a fraction in [0, 1), got {overlap!r}.")
    latent_tile = size // factor
    step = int(latent_tile * (1 - overlap))
    blend = int(size * overlap)
    keep = size - blend
    if step == 0 or step * factor != keep:
        raise InputError(
            f"tiles of {size} pixels overlapping by {overlap} do not stitch evenly ({step} latent rows per "
            f"step are {step * factor} pixels, but {keep} are kept per tile); choose an overlap that makes "
            f"{latent_tile} x overlap a whole number."
        )
    return latent_tile, step, blend, keep


def tile_sizes(largest: int, overlap: float, factor: int) -> list[int]:
    """The tile sizes automatic tiling chooses from, largest first: ``largest`` and its halves, for
    as long as they stitch."""
    sizes = [largest]
    while sizes[-1] % 2 == 0:
        try:
            tile_plan(sizes[-1] // 2, overlap, factor)
        except InputError:
            break
        sizes.append(sizes[-1] // 2)
    return sizes


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL. Parameter names are diffusers' checkpoint names.

    ``encode(images)`` -> DiagonalGaussian over unscaled latents; ``decode(latents)`` -> images,
    both NHWC in the model's dtype.

    Decoding is tiled by need (``use_tiling`` None, the default): when the run's memory estimate
    for an untiled decode (``pipelines.memory.decode_tile``) exceeds ``memory_budget`` (bytes; None:
    what this process can still get), latents are decoded in tiles, the largest of
    ``tile_sample_size`` and its halves whose decode fits, exactly as diffusers' ``tiled_decode``
    with that tile size and ``tile_overlap``. ``enable_tiling()`` tiles whatever the memory (as in
    diffusers), ``disable_tiling()`` never; ``decode_tile_size`` says what a decode will do.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        n = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * n, 2 * n, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(n, n, 1) if config.use_post_quant_conv else None
        self.use_tiling: bool | None = None  # None: by need (see the class docstring)
        self.memory_budget: int | None = None
        self.tile_sample_size = config.sample_size
        self.tile_overlap = 0.25

    @property
    def dtype(self) -> mx.Dtype:
        # A norm's weight: the CPU kernels keep a half-precision model's convolution weights half
        # and hold the rest in float32, the dtype it then computes in (cpu/widen.py).
        return self.decoder.conv_norm_out.weight.dtype

    # ------------------------------------------------------------------ encode / decode

    def encode(self, images: mx.array) -> DiagonalGaussian:
        """(B, H, W, in_channels) images in [-1, 1] -> the latent distribution, (B, H/8, W/8, latent_channels)."""
        images = self._check(images, "images", self.config.in_channels)
        f = self.config.downsample_factor
        if min(images.shape[1:3]) < f:
            raise InputError(
                f"images must be at least {f}x{f} pixels for this VAE's {f}x downsampling, got shape {tuple(images.shape)}."
            )
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, latents: mx.array) -> mx.array:
        """(B, h, w, latent_channels) unscaled latents -> (B, 8h, 8w, out_channels) images in about [-1, 1].

        Tiled where ``decode_tile_size`` says so (see the class docstring), by :meth:`tiled_decode`'s method.
        """
        latents = self._check(latents, "latents", self.config.latent_channels)
        tile = self.decode_tile_size(latents.shape)
        return self._decode(latents) if tile is None else self._tiled_decode(latents, tile)

    def tiled_decode(self, latents: mx.array) -> mx.array:
        """Decode overlapping tiles of ``tile_sample_size`` one at a time, blended where they
        overlap, as diffusers' ``AutoencoderKL.tiled_decode`` does (so the result equals diffusers'
        with the same tile size and overlap, not the untiled decode). Memory is that of one tile's
        decode."""
        latents = self._check(latents, "latents", self.config.latent_channels)
        return self._tiled_decode(latents, self.tile_sample_size)

    def decode_tile_size(self, latent_shape: tuple[int, ...]) -> int | None:
        """The tile size in image pixels that :meth:`decode` uses for latents of ``latent_shape``
        (B, h, w, C); None: it decodes them whole."""
        f = self.config.downsample_factor
        batch, height, width = latent_shape[0], latent_shape[1] * f, latent_shape[2] * f
        if self.use_tiling is False:
            return None
        if self.use_tiling:
            return self.tile_sample_size if max(height, width) > self.tile_sample_size else None
        # (imported here: the pipelines import the models)
        from ..cpu import is_accelerated
        from ..pipelines import memory

        budget = memory.decode_budget() if self.memory_budget is None else self.memory_budget
        return memory.decode_tile(self.config, (height, width), batch, self.dtype, is_accelerated(self.decoder.conv_in),
                                  budget, tile_sizes(self.tile_sample_size, self.tile_overlap, f))

    def enable_tiling(self, tile_sample_size: int | None = None, overlap: float = 0.25) -> None:
        """Decode latents larger than a tile in tiles of ``tile_sample_size`` image pixels
        (default: the config's sample_size, as diffusers), overlapping by ``overlap`` of a tile,
        whatever the memory. Encoding is never tiled."""
        self._set_tiles(tile_sample_size, overlap)
        self.use_tiling = True

    def enable_tiling_by_need(self, memory_budget: int | None = None, tile_sample_size: int | None = None,
                              overlap: float = 0.25) -> None:
        """The default: tile only decodes estimated to need more than ``memory_budget`` bytes (None:
        what this process can still get), in the largest of ``tile_sample_size`` (default: the
        config's sample_size) and its halves that fits."""
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                          or memory_budget <= 0):
            raise InputError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}.")
        self._set_tiles(tile_sample_size, overlap)
        self.use_tiling, self.memory_budget = None, memory_budget

    def disable_tiling(self) -> None:
        """Decode whole, whatever the memory."""
        self.use_tiling = False

    def _set_tiles(self, tile_sample_size: int | None, overlap: float) -> None:
        size = self.config.sample_size if tile_sample_size is None else tile_sample_size
        tile_plan(size, overlap, self.config.downsample_factor)
        self.tile_sample_size, self.tile_overlap = size, overlap

    def _decode(self, latents: mx.array) -> mx.array:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def _tiled_decode(self, latents: mx.array, size: int) -> mx.array:
        tile, step, blend, keep = tile_plan(size, self.tile_overlap, self.config.downsample_factor)
        height, width = latents.shape[1:3]
        rows, above = [], []
        for i in range(0, height, step):
            row = []
            for j in range(0, width, step):
                # diffusers blends in place, tile by tile in this same order: each tile fades in
                # from the already blended tile above and the one to its left.
                decoded = self._decode(latents[:, i:i + tile, j:j + tile])
                if above:
                    decoded = _blend(above[len(row)], decoded, blend, axis=1)
                if row:
                    decoded = _blend(row[-1], decoded, blend, axis=2)
                mx.eval(decoded)  # one tile's decoder activations at a time
                row.append(decoded)
            rows.append(mx.concatenate([t[:, :keep, :keep] for t in row], axis=2))
            mx.eval(rows[-1])
            above = row
        return mx.concatenate(rows, axis=1)

    # ------------------------------------------------------------------ input checks

    def _check(self, x, name: str, channels: int) -> mx.array:
        if not isinstance(x, mx.array):
            raise InputError(f"{name} must be an mlx array, got {type(x).__name__}.")
        if x.ndim != 4:
            raise InputError(f"{name} must be (batch, height, width, {channels}) NHWC, got shape {tuple(x.shape)}.")
        if x.shape[-1] != channels:
            hint = (
                f"; it looks like NCHW, transpose it with {name}.transpose(0, 2, 3, 1)"
                if x.shape[1] == channels
                else ""
            )
            raise InputError(
                f"{name} has {x.shape[-1]} channels in its last axis but this VAE takes {channels} "
                f"(NHWC, got shape {tuple(x.shape)}){hint}."
            )
        if not mx.issubdtype(x.dtype, mx.floating):
            raise InputError(
                f"{name} must be floating point, got {x.dtype}"
                + ("; scale 8-bit pixels to [-1, 1] with images / 127.5 - 1." if name == "images" else ".")
            )
        return x.astype(self.dtype)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: mx.Dtype | None = None,
                        cpu_kernels: bool | None = None) -> "AutoencoderKL":
        """Load ``config.json`` and the MLX ``*.safetensors`` weights of an MLX VAE folder.

        ``dtype`` None: float32 when the config says ``force_upcast`` (SDXL's VAE overflows
        float16), else the weights' own dtype (e.g. the fp16-fix VAE, whose config turns it off).
        ``cpu_kernels``: as for ``UNet2DConditionModel.from_pretrained``.
        """
        from ..weights import load_pretrained

        folder = Path(folder)
        config = VAEConfig.from_json(folder)
        model = cls(config)
        if dtype is None and config.force_upcast:
            dtype = mx.float32
        return load_pretrained(model, folder, dtype, cpu_kernels)
