"""ResnetBlock2D, Downsample2D and Upsample2D in NHWC, with diffusers' parameter names."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .norm import GroupNorm


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv1 (+ time projection) -> GroupNorm -> SiLU -> conv2, plus the skip.

    With ``temb_channels=None`` (the VAE's resnets) there is no time projection at all.
    ``nonlinearity`` reads only the norms' outputs: the CPU layer fuses each pair (cpu/swap.py)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor
        self.nonlinearity = nn.SiLU()

    def __call__(self, x: mx.array, temb_silu: mx.array | None = None) -> mx.array:
        """``temb_silu`` is SiLU(time embedding): every resnet applies that same SiLU first, so the
        UNet computes it once per forward instead of once per block. Blocks without a time
        projection take none."""
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb_silu)[:, None, None, :]
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """3x3 convolution with stride 2."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        # With padding 0 diffusers pads one row and column at the bottom/right only, so odd and
        # even sizes both halve (rounding down) as the original LDM code did.
        self.pad_bottom_right = padding == 0

    def __call__(self, x: mx.array) -> mx.array:
        if self.pad_bottom_right:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


def _nearest_indices(in_size: int, out_size: int) -> mx.array:
    # torch's "nearest": src = floor(dst * (in / out)), the scale a float32.
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
    return mx.array(np.minimum(idx, in_size - 1))


def upsample_nearest(x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
    """Nearest-neighbour upsampling of NHWC ``x``: 2x, or to ``size`` (height, width)."""
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        # A broadcast and a reshape: no gather.
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    out_h, out_w = size
    x = mx.take(x, _nearest_indices(h, out_h), axis=1)
    return mx.take(x, _nearest_indices(w, out_w), axis=2)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to an explicit size) followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        return self.conv(upsample_nearest(x, size))
