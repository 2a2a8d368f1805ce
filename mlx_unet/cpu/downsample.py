"""The CPU's Downsample2D: diffusers' bottom-right padding made by the convolution's own copy.

With ``padding=0`` the downsampler pads its input by one row and column at the bottom and right
and then convolves with stride 2: at the VAE encoder's first level (1024 px, 128 channels) that
pad was a 0.5 GB copy of its own, before the per-tap products copy the image again to lay out
their rows (``conv.Conv2d._rows``). Here the convolution makes those zeros in its copy.
"""

import mlx.core as mx

from ..models.resnet import Downsample2D as PlainDownsample2D
from .containers import adopted
from .conv import Conv2d


class Downsample2D(PlainDownsample2D):
    """Takes the place of ``models.resnet.Downsample2D``, holding the same (CPU) convolution."""

    from_module = classmethod(adopted)

    def __call__(self, x: mx.array) -> mx.array:
        if not isinstance(self.conv, Conv2d):
            return super().__call__(x)
        return self.conv(x, pad_bottom_right=1 if self.pad_bottom_right else 0)
