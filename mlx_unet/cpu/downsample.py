"""The CPU's Downsample2D: diffusers' bottom-right padding made by the convolution's own copy.

With ``padding=0`` the downsampler pads its input by one row and column at the bottom and right
and then convolves with stride 2: at the VAE encoder's first level (1024 px, 128 channels) that
pad was a 0.5 GB copy of its own, before the per-tap products copy the image again to lay out
their rows (``conv.Conv2d._rows``). Here the convolution makes those zeros in its copy.
"""

import mlx.core as mx
import mlx.nn as nn

from ..models.resnet import Downsample2D as PlainDownsample2D
from .conv import Conv2d


class Downsample2D(PlainDownsample2D):
    """Takes the place of ``models.resnet.Downsample2D``, holding the same (CPU) convolution."""

    @classmethod
    def from_module(cls, module: PlainDownsample2D) -> "Downsample2D":
        downsample = cls.__new__(cls)
        nn.Module.__init__(downsample)  # not Downsample2D's: it would build a convolution only to drop it
        downsample.conv = module.conv
        downsample.pad_bottom_right = module.pad_bottom_right
        return downsample

    def __call__(self, x: mx.array) -> mx.array:
        if not isinstance(self.conv, Conv2d):
            return super().__call__(x)
        return self.conv(x, pad_bottom_right=1 if self.pad_bottom_right else 0)
