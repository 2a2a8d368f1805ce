"""The CPU's Conv2d: nn.Conv2d's parameters, computed as matrix products that skip MLX's patch buffer.

MLX's CPU convolution first copies every k x k patch of the input into a buffer (on one
thread; 9x the input for a 3x3 kernel) and then runs one GEMM. Where the output has few
channels that copy rivals the GEMM: SDXL's 3x3 convolutions at a 64x64 latent (320 output
channels) ran at about 75 GFLOP/s, against about 140 for a plain sgemm on this 2-core machine.

So a stride-1 convolution over a large image is one product per kernel tap, with no
patch buffer. Flatten the padded image to rows of pixels (Hp * Wp, C). For output pixel (i, j)
and tap (a, b) the input pixel is row (i + a) * Wp + (j + b) = (i * Wp + j) + (a * Wp + b): a
fixed offset per tap. Each tap is therefore one contiguous run of rows times the tap's (C, O)
matrix, and the k*k products summed give every output pixel, computed on "wide" rows of Wp
pixels whose last Wp - W_out are discarded (3% extra work at 64 wide, 2 padding columns). One
extra zero row at the bottom keeps the last tap's run inside the buffer. Measured on SDXL's
shapes (fp32, one image): 1.6-1.9x faster than MLX's convolution at 64x64, about even at 32x32.

The products run over blocks of output rows (``_BLOCK_PIXELS`` wide pixels at a time), each
block's nine products one after another, so that the block's running sum stays in cache between
them instead of streaming the whole output through memory once per tap; the blocks are then
joined, which is also the copy that drops the wide rows' extra pixels.

A convolution of stride s is the same over the s x s sub-images of every s-th pixel, which one
copy lays out side by side, each padded on its own: tap (a, b) reads input pixel
(s i + a - pad, s j + b - pad), which is sub-image ((a - pad) mod s, (b - pad) mod s) at offset
((a - pad) div s, (b - pad) div s) from (i, j), again a contiguous run of rows. So the
encoder's downsampling convolutions are per-tap products too, with no 9x patch buffer (1.2 GB
at 1024 px), and their input is copied once, where padding the image and then taking its
sub-images apart copied it twice, and diffusers' downsampler pads it once more before that
(``pad_bottom_right`` makes those zeros in the same copy; ``downsample.Downsample2D``).

Below 32x32 output pixels the per-tap products get too short to run well; such convolutions
gather the patches themselves (a concatenation of k*k shifted views, what MLX does) and multiply
once. That order of summation is MLX's, bit for bit.

Stride-1 3x3 convolutions over enough pixels and channels (``winograd.applies``: at 512 px the
UNet's 64x64 level and, in a guided batch of two, its 32x32 one; every level of the VAE) take
Winograd's F(4x4, 3x3) instead, 4x fewer multiply-adds (``winograd.py``).

The weight keeps the (out, kh, kw, in) shape and name of a converted checkpoint but
lies in memory as (kh, kw, in, out): each tap's (in, out) matrix, and the whole
(kh*kw*in, out) patch matrix, are then row-major views that BLAS reads without a copy.
Half precision is computed in float32 and rounded once, as ``linear.Linear`` does, the weight
widened once per call (``taps``).
"""

import mlx.core as mx
import mlx.nn as nn

from . import winograd
from .half import float32


# Output pixels per image from which the per-tap products beat gathering the patches.
_TAPS_FROM_PIXELS = 32 * 32
# At most this many inputs (outputs) per tap product's row, kernel taps included, the patches
# (the products of all taps at once, ``_by_outputs``) are cheaper than per-tap products: an image's
# 3 channels, a latent's 4.
_FEW = 64
# Wide output pixels per block of per-tap products: a float32 running sum of 2-8 MiB at 128-512
# output channels, which the products keep in the caches.
_BLOCK_PIXELS = 16384


def product(accumulated: mx.array | None, rows: mx.array, matrix: mx.array) -> mx.array:
    """``accumulated + rows @ matrix`` in one BLAS call; the first product of a convolution
    without bias (a LoRA's down projection) has nothing to add to."""
    return rows @ matrix if accumulated is None else mx.addmm(accumulated, rows, matrix)


def tap_blocks(rows: mx.array, taps: list[tuple[int, mx.array]], bias: mx.array | None, out_h: int,
               wide: int, out_w: int) -> list[mx.array]:
    """sum over taps of ``rows[offset + p] @ matrix`` for every wide output pixel p of one image,
    in blocks of output rows: float32 (rows, out_w, out_channels) views, top to bottom.

    ``rows``: the padded image flattened to (pixels, in_channels) float32, ``wide`` pixels per
    row; ``taps``: (row offset, (in, out) matrix) pairs; ``bias`` starts the sum (None: nothing)."""
    step = max(1, min(out_h, _BLOCK_PIXELS // wide))
    blocks = []
    for top in range(0, out_h, step):
        length = min(step, out_h - top) * wide
        out = bias
        for offset, tap in taps:
            start = top * wide + offset
            out = product(out, rows[start:start + length], tap)
        blocks.append(out.reshape(-1, wide, out.shape[-1])[:, :out_w])
    return blocks


def joined(blocks: list[mx.array]) -> mx.array:
    """The blocks as one contiguous array: the copy that drops the wide rows' extra pixels."""
    return mx.contiguous(blocks[0]) if len(blocks) == 1 else mx.concatenate(blocks, axis=0)


class Conv2d(nn.Conv2d):
    """Takes the place of a square-kernel, ungrouped, undilated ``nn.Conv2d`` over NHWC input
    (``from_module``), with the same parameters."""

    def __init__(self, weight: mx.array, bias: mx.array | None, stride: int = 1, padding: int = 0):
        # nn.Module's __init__, not nn.Conv2d's: that draws a random kernel only to drop it,
        # moving MLX's global random state (see linear.Linear).
        nn.Module.__init__(self)
        self.weight = self.laid_out(weight)
        if bias is not None:
            self.bias = bias
        self.stride, self.padding = (stride, stride), (padding, padding)
        self.dilation, self.groups = 1, 1

    @classmethod
    def from_module(cls, module: nn.Conv2d) -> "Conv2d":
        return cls(module.weight, module.get("bias"), module.stride[0], module.padding[0])

    @staticmethod
    def supports(module: nn.Conv2d) -> bool:
        """Whether this class computes ``module`` exactly: the convolutions SD models have."""
        weight = module.weight
        return (weight.shape[1] == weight.shape[2] and module.groups == 1 and module.dilation in (1, (1, 1))
                and module.stride[0] == module.stride[1] and module.padding[0] == module.padding[1])

    # The weight's axes in the order they lie in memory: (kh, kw, in, out).
    memory_order = (1, 2, 3, 0)

    @staticmethod
    def laid_out(weight: mx.array) -> mx.array:
        """``weight`` (out, kh, kw, in), unchanged in value and shape, laid out as (kh, kw, in, out)."""
        return mx.contiguous(weight.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)

    def __call__(self, x: mx.array, pad_bottom_right: int = 0) -> mx.array:
        """``pad_bottom_right``: zero rows and columns added below and right of ``x`` first (as
        diffusers' downsampler does), by the per-tap products in the copy that lays out their rows."""
        dtype = x.dtype
        stride, pad = self.stride[0], self.padding[0]
        out_h = (x.shape[1] + 2 * pad + pad_bottom_right - self.weight.shape[1]) // stride + 1
        out_w = (x.shape[2] + 2 * pad + pad_bottom_right - self.weight.shape[1]) // stride + 1
        path = self._path(x.shape[0], out_h, out_w)
        if pad_bottom_right and path not in ("outputs", "taps"):
            x = mx.pad(x, [(0, 0), (0, pad_bottom_right), (0, pad_bottom_right), (0, 0)])
        if path == "one product":
            rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            y = product(self._bias(), rows, self.taps()[0, 0]).reshape(x.shape[0], out_h, out_w, -1)
        elif path == "winograd":
            y = winograd.convolve(x, self.taps(), self._bias(), pad)
        elif path == "patches":
            y = self._by_patches(x, out_h, out_w)
        elif path == "outputs":
            y = self._by_outputs(x, out_h, out_w)
        else:
            y = self._by_taps(x, out_h, out_w)
        return y.astype(dtype)

    def _path(self, batch: int, out_h: int, out_w: int) -> str:
        """How this convolution is computed for ``batch`` images of ``out_h`` x ``out_w`` outputs."""
        out_channels, k, _, in_channels = self.weight.shape
        stride, pad = self.stride[0], self.padding[0]
        if k == 1 and stride == 1 and pad == 0:  # one product over all pixels
            return "one product"
        if k == 3 and stride == 1 and winograd.applies(batch, out_h, out_w, in_channels, out_channels):
            return "winograd"
        if out_h * out_w < _TAPS_FROM_PIXELS or in_channels * k * k <= _FEW:
            return "patches"
        return "outputs" if out_channels * k * k <= _FEW else "taps"

    def taps(self) -> mx.array:
        """The weight as (kh, kw, in, out) float32, row-major: the laid-out weight itself, or its
        half-precision values widened. ``taps()[a, b]`` is tap (a, b)'s (in, out) matrix."""
        return float32(self.weight.transpose(1, 2, 3, 0))

    def _bias(self) -> mx.array | None:
        return float32(self.bias) if "bias" in self else None

    def _rows(self, x: mx.array, out_h: int, out_w: int) -> tuple[mx.array, int, list[int]]:
        """(the padded sub-images flattened to (batch, pixels, channels) float32 rows, their width,
        each tap's row offset in them, taps in (a, b) order). Rows and columns beyond the padding
        that the output's size needs (``pad_bottom_right``) are zeros of the same copy."""
        batch, height, width, channels = x.shape
        k, stride, pad = self.weight.shape[1], self.stride[0], self.padding[0]
        if height % stride or width % stride:  # whole sub-images: padded once more, a rare copy
            x = mx.pad(x, [(0, 0), (0, -height % stride), (0, -width % stride), (0, 0)])
            height, width = x.shape[1:3]
        # Sub-image (u, v) holds pixels (s i + u, s j + v), after `top` zero rows and columns: the
        # most that a tap reaches above or left of the image, (pad / s) rounded up.
        top = -(-pad // stride)
        shift = [(a - pad) // stride + top for a in range(k)]  # a tap's offset in its sub-image
        # Each sub-image is as wide as the output plus the taps' reach, and one row taller than
        # that: the last tap's run of rows ends past it.
        sub_h, sub_w = out_h + shift[-1] + 1, out_w + shift[-1]
        phases = x[:, None, None] if stride == 1 else x.reshape(
            batch, height // stride, stride, width // stride, stride, channels).transpose(0, 2, 4, 1, 3, 5)
        phases = phases[:, :, :, :sub_h - top, :sub_w - top]  # what no tap reads, if any, is left out
        padded = mx.pad(phases, [(0, 0), (0, 0), (0, 0), (top, sub_h - top - phases.shape[3]),
                                 (top, sub_w - top - phases.shape[4]), (0, 0)])
        padded = padded.astype(mx.float32)  # once, not per image: for half precision a copy
        size = sub_h * sub_w
        offsets = [(((a - pad) % stride) * stride + (b - pad) % stride) * size + shift[a] * sub_w + shift[b]
                   for a in range(k) for b in range(k)]
        return padded.reshape(batch, -1, channels), sub_w, offsets

    def _by_taps(self, x: mx.array, out_h: int, out_w: int) -> mx.array:
        rows, sub_w, offsets = self._rows(x, out_h, out_w)
        matrices = self.taps()
        k = matrices.shape[0]
        taps = list(zip(offsets, (matrices[a, b] for a in range(k) for b in range(k))))
        bias = self._bias()
        images = [joined(tap_blocks(rows[n], taps, bias, out_h, sub_w, out_w)) for n in range(x.shape[0])]
        return images[0][None] if len(images) == 1 else mx.stack(images)

    def _by_outputs(self, x: mx.array, out_h: int, out_w: int) -> mx.array:
        """For few output channels (an image's 3): one product with every tap's matrix side by
        side, (pixels, taps * out), then each tap's columns summed at its offset. The per-tap
        products would each stream the whole input for a handful of columns."""
        rows, sub_w, offsets = self._rows(x, out_h, out_w)
        out_channels, in_channels = self.weight.shape[0], self.weight.shape[3]
        matrix = self.taps().transpose(2, 0, 1, 3).reshape(in_channels, -1)
        length, bias = out_h * sub_w, self._bias()
        images = []
        for n in range(x.shape[0]):
            products = rows[n] @ matrix
            out = mx.zeros((length, out_channels), mx.float32) if bias is None else mx.broadcast_to(bias, (length, out_channels))
            for t, offset in enumerate(offsets):
                out = out + products[offset:offset + length, t * out_channels:(t + 1) * out_channels]
            images.append(out.reshape(out_h, sub_w, out_channels)[:, :out_w])
        return mx.stack(images)

    def _by_patches(self, x: mx.array, out_h: int, out_w: int) -> mx.array:
        k, stride, pad = self.weight.shape[1], self.stride[0], self.padding[0]
        padded = mx.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)]) if pad else x
        span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
        # Patch features in (a, b, channel) order, matching the laid-out weight's rows.
        patches = mx.concatenate(
            [padded[:, a:a + span_h:stride, b:b + span_w:stride] for a in range(k) for b in range(k)], axis=-1
        ).astype(mx.float32)
        matrix = self.taps().reshape(-1, self.weight.shape[0])
        out = product(self._bias(), patches.reshape(-1, patches.shape[-1]), matrix)
        return out.reshape(x.shape[0], out_h, out_w, -1)
