"""GroupNorm computed directly on NHWC activations.

``mlx.nn.GroupNorm(pytorch_compatible=True)`` transposes to channel-major groups and back; here the
groups are a free reshape of the contiguous channel axis, so nothing is copied. Statistics are
taken in float32 whatever the activation dtype: a half-precision variance over a 128x128 SDXL
latent loses the digits that the normalised output depends on.
"""

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError


class GroupNorm(nn.Module):
    def __init__(self, num_groups: int, num_channels: int, eps: float):
        super().__init__()
        if num_channels % num_groups:
            raise ConfigError(f"{num_channels} channels do not split into {num_groups} groups; norm_num_groups must divide every width.")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((num_channels,))
        self.bias = mx.zeros((num_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        groups = x.astype(mx.float32).reshape(batch, height * width, self.num_groups, -1)
        mean = groups.mean(axis=(1, 3), keepdims=True)
        var = groups.var(axis=(1, 3), keepdims=True)  # biased, as torch's group_norm
        normed = ((groups - mean) * mx.rsqrt(var + self.eps)).reshape(x.shape)
        return (normed * self.weight + self.bias).astype(x.dtype)
