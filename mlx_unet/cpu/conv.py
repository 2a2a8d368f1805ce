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

Below 32x32 pixels the per-tap products get too short to run well, and strided convolutions
have no contiguous runs; both gather the patches themselves (a concatenation of k*k shifted
views, what MLX does) and multiply once. That order of summation is MLX's, bit for bit.

The weight keeps the (out, kh, kw, in) shape and name of a converted checkpoint but
lies in memory as (kh, kw, in, out): each tap's (in, out) matrix, and the whole
(kh*kw*in, out) patch matrix, are then row-major views that BLAS reads without a copy.
Half precision is computed in float32 and rounded once, as ``linear.Linear`` does.
"""

import mlx.core as mx
import mlx.nn as nn


# Output pixels per image from which the per-tap products beat gathering the patches.
_TAPS_FROM_PIXELS = 32 * 32


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

    def __call__(self, x: mx.array) -> mx.array:
        dtype = x.dtype
        k, (stride, _), (pad, _) = self.weight.shape[1], self.stride, self.padding
        out_h = (x.shape[1] + 2 * pad - k) // stride + 1
        out_w = (x.shape[2] + 2 * pad - k) // stride + 1
        if stride == 1 and (k == 1 or out_h * out_w >= _TAPS_FROM_PIXELS):
            y = self._by_taps(x, out_h, out_w)
        else:
            y = self._by_patches(x, out_h, out_w)
        return y.astype(dtype)

    def _tap(self, a: int, b: int) -> mx.array:
        """The (in, out) float32 matrix of kernel tap (a, b): a view of the laid-out weight."""
        return self.weight[:, a, b, :].T.astype(mx.float32)

    def _product(self, accumulated: mx.array | None, rows: mx.array, tap: mx.array) -> mx.array:
        """``accumulated + rows @ tap`` in one BLAS call; the first product of a convolution
        without bias (a LoRA's down projection) has nothing to add to."""
        return rows @ tap if accumulated is None else mx.addmm(accumulated, rows, tap)

    def _bias(self) -> mx.array | None:
        return self.bias.astype(mx.float32) if "bias" in self else None

    def _by_taps(self, x: mx.array, out_h: int, out_w: int) -> mx.array:
        batch, _, _, channels = x.shape
        k, pad = self.weight.shape[1], self.padding[0]
        if k == 1 and pad == 0:  # a 1x1 convolution is one product over all pixels
            rows = x.reshape(-1, channels).astype(mx.float32)
            return self._product(self._bias(), rows, self._tap(0, 0)).reshape(batch, out_h, out_w, -1)
        # One extra zero row below the image: the last tap's run of rows ends k - 1 pixels past
        # the padded image.
        padded = mx.pad(x, [(0, 0), (pad, pad + 1), (pad, pad), (0, 0)])
        wide = padded.shape[2]
        rows = padded.astype(mx.float32).reshape(batch, -1, channels)
        length = out_h * wide
        # Widened once, not per image: for half precision each is a float32 copy.
        taps = [(a * wide + b, self._tap(a, b)) for a in range(k) for b in range(k)]
        bias = self._bias()
        images = []
        for n in range(batch):
            out = bias
            for start, tap in taps:
                out = self._product(out, rows[n, start:start + length], tap)
            images.append(out.reshape(out_h, wide, -1)[:, :out_w])
        return mx.stack(images)

    def _by_patches(self, x: mx.array, out_h: int, out_w: int) -> mx.array:
        k, stride, pad = self.weight.shape[1], self.stride[0], self.padding[0]
        padded = mx.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)]) if pad else x
        span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
        # Patch features in (a, b, channel) order, matching the laid-out weight's rows.
        patches = mx.concatenate(
            [padded[:, a:a + span_h:stride, b:b + span_w:stride] for a in range(k) for b in range(k)], axis=-1
        ).astype(mx.float32)
        matrix = self.weight.transpose(1, 2, 3, 0).reshape(-1, self.weight.shape[0]).astype(mx.float32)
        out = self._product(self._bias(), patches.reshape(-1, patches.shape[-1]), matrix)
        return out.reshape(x.shape[0], out_h, out_w, -1)
