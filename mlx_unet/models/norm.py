"""GroupNorm computed directly on NHWC activations.

``mlx.nn.GroupNorm(pytorch_compatible=True)`` transposes to channel-major groups and back; here the
groups are a free reshape of the contiguous channel axis, so nothing is copied. Statistics are
taken in float32 whatever the activation dtype: a half-precision variance over a 128x128 SDXL
latent loses the digits that the normalised output depends on.

The statistics are sums over pixels per channel, each a reduction down the columns of a
contiguous (pixels, channels) matrix (over the width, then the height: two short sums, which
also round less than one long one), folded into groups only at the end; a reduction over a
group's strided axes at once (pixels and the group's channels) ran several times slower on the
CPU. The variance is the mean of squares about the group's mean (two passes), not
E[x^2] - E[x]^2, which cancels when the mean is large against the spread. The output is then
``x * scale + shift`` with one float32 scale and shift per image and channel, as torch's own
kernel applies it.
"""

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError


def pixel_sums(x: mx.array) -> mx.array:
    """(B, H, W, C) -> (B, 1, 1, C): each channel's sum over the pixels."""
    return x.sum(axis=2, keepdims=True).sum(axis=1, keepdims=True)


class GroupNorm(nn.Module):
    def __init__(self, num_groups: int, num_channels: int, eps: float):
        super().__init__()
        if num_channels % num_groups:
            raise ConfigError(f"{num_channels} channels do not split into {num_groups} groups; norm_num_groups must divide every width.")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((num_channels,))
        self.bias = mx.zeros((num_channels,))

    def group_means(self, sums: mx.array, count: int) -> mx.array:
        """Per-channel sums (B, 1, 1, C) -> each channel's group mean of ``count`` values per channel,
        broadcast back to (B, 1, 1, C)."""
        batch, channels = sums.shape[0], sums.shape[-1]
        groups = sums.reshape(batch, self.num_groups, -1)
        means = groups.sum(axis=-1, keepdims=True) / (count * groups.shape[-1])
        return mx.broadcast_to(means, groups.shape).reshape(batch, 1, 1, channels)

    def centered_squares(self, x: mx.array, mean: mx.array) -> mx.array:
        return mx.square(x.astype(mx.float32) - mean)

    def scale_shift(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """float32 (scale, shift), each (B, 1, 1, C), such that the normalised x is x * scale + shift."""
        count = x.shape[1] * x.shape[2]
        mean = self.group_means(pixel_sums(x.astype(mx.float32)), count)
        var = self.group_means(pixel_sums(self.centered_squares(x, mean)), count)  # biased, as torch's
        return self.scale_shift_of(mean, var)

    def scale_shift_of(self, mean: mx.array, var: mx.array) -> tuple[mx.array, mx.array]:
        """(scale, shift) from each channel's group mean and variance, (B, 1, 1, C) float32."""
        scale = self.weight.astype(mx.float32) * mx.rsqrt(var + self.eps)
        return scale, self.bias.astype(mx.float32) - mean * scale

    def __call__(self, x: mx.array) -> mx.array:
        scale, shift = self.scale_shift(x)
        return (x.astype(mx.float32) * scale + shift).astype(x.dtype)
