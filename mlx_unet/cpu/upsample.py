"""The CPU's Upsample2D: nearest-neighbour 2x and the 3x3 convolution after it, in one step.

Upsampling repeats each pixel 2x2, so each output pixel's 3x3 window covers only 2x2 distinct
source pixels, and which kernel rows and columns fall on which of them depends only on the
output pixel's parity: for an even output row 2i the window's rows read source rows i - 1 (kernel
row 0) and i (rows 1 and 2), for an odd row 2i + 1 source rows i (kernel rows 0 and 1) and i + 1
(row 2); columns alike. So each of the four parities (p, q) is a 2x2 convolution of the source
image, with kernel taps summed from the 3x3 one, computed by the per-tap products of
``conv.tap_blocks`` at the source size, and the four results are interleaved into the output.

That is 16 products over the source pixels where the convolution of the upsampled image takes 9
over four times as many pixels (0.44x the multiply-adds), and the upsampled image, four times
the input, is never made. The sums of kernel taps round differently from torch's sums of
products by float32 rounding only.

The VAE's ``Upsample2D`` holds its convolution; the tiny VAE's decoder lists an ``Upsample`` and
the convolution after it side by side, and its CPU version (``cpu/vae.py``) runs the pair here too.
"""

import mlx.core as mx
import mlx.nn as nn

from ..models.resnet import Upsample2D as PlainUpsample2D
from .containers import adopted
from .conv import Conv2d, joined, tap_blocks

# For output parity p: the kernel rows that fall on each of the two source rows it reads
# (row offsets 0 and 1 in the padded source image, relative to p).
_MERGED = (((0,), (1, 2)), ((0, 1), (2,)))


class Upsample2D(PlainUpsample2D):
    """Takes the place of ``models.resnet.Upsample2D``, holding the same (CPU) convolution."""

    from_module = classmethod(adopted)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        if (size is not None and tuple(size) != (2 * x.shape[1], 2 * x.shape[2])) or not fuses(self.conv):
            return super().__call__(x, size)
        return upsampled_and_convolved(self.conv, x)


def fuses(conv: nn.Module) -> bool:
    """Whether ``conv``, after a 2x nearest-neighbour upsampling, is computed with it here."""
    return isinstance(conv, Conv2d) and conv.weight.shape[1] == 3 and conv.stride[0] == 1 and conv.padding[0] == 1


def upsampled_and_convolved(conv: Conv2d, x: mx.array) -> mx.array:
    """``conv(upsample_nearest(x))``, for a ``conv`` that ``fuses``."""
    batch, height, width, _ = x.shape
    # The source image padded and flattened as the 3x3 convolution over it lays it out.
    rows, wide, _ = conv._rows(x, height, width)
    bias, matrices = conv._bias(), conv.taps()
    taps = {}
    for p in range(2):
        for q in range(2):
            taps[p, q] = [((p + r) * wide + q + s, _summed(matrices, _MERGED[p][r], _MERGED[q][s]))
                          for r in range(2) for s in range(2)]
    images = []
    for n in range(batch):
        phases = [tap_blocks(rows[n], taps[pq], bias, height, wide, width) for pq in ((0, 0), (0, 1), (1, 0), (1, 1))]
        # Per block of source rows: the four parities side by side, (4, rows, width, out),
        # then read out as (rows, p, width, q, out), which is the output's (2 rows, 2 width).
        slabs = [mx.stack(parts).reshape(2, 2, *parts[0].shape).transpose(2, 0, 3, 1, 4) for parts in zip(*phases)]
        images.append(joined(slabs).reshape(2 * height, 2 * width, -1))
    out = images[0][None] if batch == 1 else mx.stack(images)
    return out.astype(x.dtype)


def _summed(matrices: mx.array, rows: tuple[int, ...], columns: tuple[int, ...]) -> mx.array:
    total = None
    for a in rows:
        for b in columns:
            tap = matrices[a, b]
            total = tap if total is None else total + tap
    return total
