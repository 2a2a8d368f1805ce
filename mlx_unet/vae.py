"""AutoencoderKL: diffusers' VAE (Stable Diffusion, SDXL) in MLX, NHWC, driven by a VAEConfig.

Images are (batch, height, width, 3) in [-1, 1]; latents are (batch, height / 8, width / 8, 4),
unscaled (the sampler multiplies by ``scaling_factor`` and adds ``shift_factor`` itself).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .activations import silu
from .attention import scaled_dot_product_attention
from .config import ConfigError, positive_int, preset, read_config_json
from .conv import Conv2d
from .linear import Linear
from .norm import GroupNorm
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .unet import InputError

# diffusers' Encoder and Decoder hard-code this eps for every GroupNorm (resnets, attention and
# output norm), whatever the config.
_EPS = 1e-6

# Every field of diffusers' AutoencoderKL config, with diffusers' defaults.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


@dataclass(frozen=True)
class VAEConfig:
    """The architecture and latent scaling of one AutoencoderKL.

    ``sample_size`` is the image size the VAE was trained at; it is the default tile size for
    tiled decoding. ``force_upcast`` says the VAE's activations overflow float16 (SDXL's do), so
    it is run in float32 unless asked otherwise.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel, along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "VAEConfig":
        """Parse a diffusers config dict (as in a ``vae/config.json``)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a VAE config must be a JSON object, got {type(raw).__name__}.")
        kind = raw.get("_class_name", "AutoencoderKL")
        if kind != "AutoencoderKL":
            raise ConfigError(f"this config describes a {kind}, not an AutoencoderKL.")
        raw = {k: v for k, v in raw.items() if not k.startswith("_")}
        unknown = sorted(raw.keys() - _DIFFUSERS_DEFAULTS.keys())
        if unknown:
            raise ConfigError(
                f"config field {unknown[0]!r} (value {raw[unknown[0]]!r}) is not an AutoencoderKL field this "
                "package knows; it cannot be honoured, so the config is refused."
            )
        return _normalise({**_DIFFUSERS_DEFAULTS, **raw})

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEConfig":
        """Parse a ``config.json`` file, or the one inside a folder."""
        return cls.from_dict(read_config_json(path, "VAE"))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "VAEConfig":
        """One of ``VAE_PRESETS`` (diffusers field names), optionally with fields overridden."""
        return cls.from_dict({**preset(VAE_PRESETS, name, "VAE"), **overrides})

    def to_diffusers_dict(self) -> dict[str, Any]:
        """The config in diffusers' field names, loadable by ``AutoencoderKL(**d)``."""
        levels = len(self.block_out_channels)
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            **d,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "act_fn": "silu",
        }


def _number(name: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        kind = "a positive number" if positive else "a number"
        raise ConfigError(f"config field {name!r} must be {kind}, got {value!r}.")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config field {name!r} must be true or false, got {value!r}.")
    return value


def _normalise(d: dict[str, Any]) -> VAEConfig:
    if not isinstance(d["block_out_channels"], (list, tuple)) or not d["block_out_channels"]:
        raise ConfigError(f"config field 'block_out_channels' must be a non-empty list, got {d['block_out_channels']!r}.")
    channels = tuple(positive_int("block_out_channels", c) for c in d["block_out_channels"])
    levels = len(channels)
    for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = d[name]
        if not isinstance(types, (list, tuple)) or len(types) != levels:
            raise ConfigError(
                f"config field {name!r} = {types!r} must list one block type per entry of block_out_channels ({levels})."
            )
        other = next((t for t in types if t != allowed), None)
        if other is not None:
            raise ConfigError(
                f"config field {name!r} holds {other!r}; only {allowed!r} is supported (the AutoencoderKL of SD and SDXL)."
            )
    if d["act_fn"] != "silu":
        raise ConfigError(f"config field 'act_fn' = {d['act_fn']!r} is not supported (only 'silu').")
    # Pipelines, not the model, read these; a sampler that ignored them would scale latents wrongly.
    for name in ("latents_mean", "latents_std"):
        if d[name] is not None:
            raise ConfigError(
                f"config field {name!r} is set; per-channel latent statistics are not supported (only scaling_factor "
                "and shift_factor)."
            )
    groups = positive_int("norm_num_groups", d["norm_num_groups"])
    for c in channels:
        if c % groups:
            raise ConfigError(f"block_out_channels entry {c} does not split into norm_num_groups = {groups} groups.")
    sample_size = d["sample_size"]
    # diffusers accepts [height, width] here but tiles with the first entry only; a square one is that int.
    if isinstance(sample_size, (list, tuple)) and len(set(sample_size)) == 1:
        sample_size = sample_size[0]
    shift = d["shift_factor"]
    return VAEConfig(
        in_channels=positive_int("in_channels", d["in_channels"]),
        out_channels=positive_int("out_channels", d["out_channels"]),
        block_out_channels=channels,
        layers_per_block=positive_int("layers_per_block", d["layers_per_block"]),
        latent_channels=positive_int("latent_channels", d["latent_channels"]),
        norm_num_groups=groups,
        sample_size=positive_int("sample_size", sample_size),
        scaling_factor=_number("scaling_factor", d["scaling_factor"], positive=True),
        shift_factor=None if shift is None else _number("shift_factor", shift),
        force_upcast=_flag("force_upcast", d["force_upcast"]),
        use_quant_conv=_flag("use_quant_conv", d["use_quant_conv"]),
        use_post_quant_conv=_flag("use_post_quant_conv", d["use_post_quant_conv"]),
        mid_block_add_attention=_flag("mid_block_add_attention", d["mid_block_add_attention"]),
    )


# The architecture fields of the published config.json files, in diffusers' names.
VAE_PRESETS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
    "sdxl": {
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    },
    # SDXL's structure (four levels, so latents are 1/8 of the image) at a width that runs in
    # milliseconds; its 128-pixel tiles match the tiny UNet preset's 16-pixel latents.
    "tiny": {
        "block_out_channels": [16, 32, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 128,
        "scaling_factor": 0.13025,
        "force_upcast": False,
    },
}


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
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = [Linear(channels, channels)]  # index 0, as in diffusers' ModuleList
        self.scale = channels**-0.5

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        # One head: (B, 1, tokens, C) is already the (batch, heads, tokens, head_dim) layout.
        tokens = self.group_norm(x).reshape(b, 1, h * w, c)
        out = scaled_dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), self.scale)
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
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, i < last)
            for i in range(len(channels))
        ]
        self.mid_block = VAEMidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1], _EPS)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent -> image. Each up level has one resnet more than the encoder's levels (diffusers'
    layers_per_block + 1)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        last = len(channels) - 1
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = VAEMidBlock(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, i < last)
            for i in range(len(channels))
        ]
        self.conv_norm_out = GroupNorm(groups, channels[-1], _EPS)
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


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


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL. Parameter names are diffusers' checkpoint names.

    ``encode(images)`` -> DiagonalGaussian over unscaled latents; ``decode(latents)`` -> images,
    both NHWC in the model's dtype.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        n = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * n, 2 * n, 1) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(n, n, 1) if config.use_post_quant_conv else None
        self.use_tiling = False
        self.tile_sample_size = config.sample_size
        self.tile_overlap = 0.25

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv_in.weight.dtype

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

        With ``use_tiling`` a latent larger than a tile is decoded by :meth:`tiled_decode`.
        """
        latents = self._check(latents, "latents", self.config.latent_channels)
        if self.use_tiling and max(latents.shape[1:3]) > self._tile_plan()[0]:
            return self._tiled_decode(latents)
        return self._decode(latents)

    def tiled_decode(self, latents: mx.array) -> mx.array:
        """Decode overlapping tiles one at a time, blended where they overlap, as diffusers'
        ``AutoencoderKL.tiled_decode`` does (so the result equals diffusers' with the same tile
        size and overlap, not the untiled decode). Memory is that of one tile's decode."""
        return self._tiled_decode(self._check(latents, "latents", self.config.latent_channels))

    def enable_tiling(self, tile_sample_size: int | None = None, overlap: float = 0.25) -> None:
        """Decode latents larger than a tile in tiles of ``tile_sample_size`` image pixels
        (default: the config's sample_size, as diffusers), overlapping by ``overlap`` of a tile.
        Encoding is never tiled."""
        size = self.config.sample_size if tile_sample_size is None else tile_sample_size
        previous = (self.tile_sample_size, self.tile_overlap)
        self.tile_sample_size, self.tile_overlap = size, overlap
        try:
            self._tile_plan()
        except InputError:
            self.tile_sample_size, self.tile_overlap = previous
            raise
        self.use_tiling = True

    def _decode(self, latents: mx.array) -> mx.array:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def _tile_plan(self) -> tuple[int, int, int, int]:
        """(latent tile size, latent step between tiles, blended pixels, pixels kept per tile),
        computed as diffusers does, after checking that the kept parts stitch into the full image."""
        size, overlap, f = self.tile_sample_size, self.tile_overlap, self.config.downsample_factor
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % f:
            raise InputError(f"tile_sample_size must be a positive multiple of {f} pixels, got {size!r}.")
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
            raise InputError(f"the tile overlap must be a fraction in [0, 1), got {overlap!r}.")
        latent_tile = size // f
        step = int(latent_tile * (1 - overlap))
        blend = int(size * overlap)
        keep = size - blend
        if step == 0 or step * f != keep:
            raise InputError(
                f"tiles of {size} pixels overlapping by {overlap} do not stitch evenly ({step} latent rows per "
                f"step are {step * f} pixels, but {keep} are kept per tile); choose an overlap that makes "
                f"{latent_tile} x overlap a whole number."
            )
        return latent_tile, step, blend, keep

    def _tiled_decode(self, latents: mx.array) -> mx.array:
        tile, step, blend, keep = self._tile_plan()
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
    def from_pretrained(cls, folder: str | Path, dtype: mx.Dtype | None = None) -> "AutoencoderKL":
        """Load ``config.json`` and the MLX ``*.safetensors`` weights of an MLX VAE folder.

        ``dtype`` None: float32 when the config says ``force_upcast`` (SDXL's VAE overflows
        float16), else the weights' own dtype (e.g. the fp16-fix VAE, whose config turns it off).
        """
        from .weights import load_weights_folder

        folder = Path(folder)
        config = VAEConfig.from_json(folder)
        model = cls(config)
        if dtype is None and config.force_upcast:
            dtype = mx.float32
        load_weights_folder(model, folder, dtype)
        return model
