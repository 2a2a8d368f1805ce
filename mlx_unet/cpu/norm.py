"""GroupNorm on the CPU, and GroupNorm fused with the SiLU that follows it in every resnet.

The statistics are ``models.norm.GroupNorm``'s; here the elementwise passes are compiled into
g++-built loops (``mx.compile``), and where a SiLU follows the norm (``NormSiLU``) the normalised
activation is never written out: the SiLU's kernels recompute ``x * scale + shift`` from x.

SiLU(z) = z / (1 + 2**y) with y = -z log2(e), as ``activations.silu``, but in three kernels of
one output each: MLX's compiled loops with two outputs, or a clip beside other arithmetic, are not
vectorised by g++ and ran several times slower than these. y is clipped in a kernel of its own;
2**round(y) is written as a float's bits by the second (a bit-cast ends a kernel); the third
evaluates the polynomial for the fraction and divides.
"""

import mlx.core as mx

from ..models.norm import GroupNorm as PlainGroupNorm
from ..models.norm import pixel_sums
from .activations import _EXP2, _ROUNDER, LOG2_E, _estrin
from .streams import second_stream

F32 = mx.float32


@mx.compile
def _centered_squares(x: mx.array, mean: mx.array) -> mx.array:
    d = x.astype(F32) - mean
    return d * d


@mx.compile
def _affine(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    return (x.astype(F32) * scale + shift).astype(x.dtype)


@mx.compile
def _exponent(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    # Clipped so 2**round(y) stays a normal float; far outside, 1 + 2**y is 1 or so large that
    # z / it is 0 either way.
    return mx.clip((x.astype(F32) * scale + shift) * -LOG2_E, -126.0, 127.0)


@mx.compile
def _power_bits(y: mx.array) -> mx.array:
    # 2**n as a float's bits, (n + 127) << 23, computed in float (exact) as activations does.
    n = (y + _ROUNDER) - _ROUNDER
    return ((n + 127.0) * 8388608.0).astype(mx.int32)


@mx.compile
def _silu_of_affine(x: mx.array, scale: mx.array, shift: mx.array, y: mx.array, two_n: mx.array) -> mx.array:
    z = x.astype(F32) * scale + shift
    n = (y + _ROUNDER) - _ROUNDER
    return (z / (1.0 + _estrin(_EXP2, y - n) * two_n)).astype(x.dtype)


def affine_silu(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    """SiLU(x * scale + shift), computed in float32 and rounded once to x's dtype."""
    y = _exponent(x, scale, shift)
    return _silu_of_affine(x, scale, shift, y, _power_bits(y).view(F32))


class GroupNorm(PlainGroupNorm):
    """Takes the place of ``models.norm.GroupNorm``, with the same parameters."""

    @classmethod
    def from_module(cls, module: PlainGroupNorm) -> "GroupNorm":
        norm = cls(module.num_groups, module.weight.shape[0], module.eps)
        norm.weight, norm.bias = module.weight, module.bias
        return norm

    def centered_squares(self, x: mx.array, mean: mx.array) -> mx.array:
        return _centered_squares(x, mean)

    def __call__(self, x: mx.array) -> mx.array:
        return _affine(x, *self.scale_shift(x))


class NormSiLU(GroupNorm):
    """SiLU(GroupNorm(x)): takes the place of a GroupNorm whose output only a SiLU reads, the SiLU
    itself becoming an ``Identity`` (``swap``); same parameters as the GroupNorm.

    A large x is computed in bands of rows, taking turns on two streams (MLX runs each stream's
    operations on one thread, so this puts the second core to work while BLAS is idle), the
    statistics as sums of the bands' sums; the bands are joined at the end. A band's float32
    intermediates are a few MiB, so they stay in the caches and only one band's are alive per
    stream at a time, rather than three activation-sized arrays."""

    def __call__(self, x: mx.array) -> mx.array:
        bands = _bands(x)
        if len(bands) == 1:
            return affine_silu(x, *self.scale_shift(x))
        streams = (mx.default_stream(mx.cpu), second_stream())
        count = x.shape[1] * x.shape[2]

        def on_streams(compute) -> list[mx.array]:
            results = []
            for index, band in enumerate(bands):
                with mx.stream(streams[index % 2]):
                    results.append(compute(band))
            return results

        mean = self.group_means(sum(on_streams(lambda band: pixel_sums(band.astype(F32)))), count)
        var = self.group_means(sum(on_streams(lambda band: pixel_sums(_centered_squares(band, mean)))), count)
        scale, shift = self.scale_shift_of(mean, var)
        return mx.concatenate(on_streams(lambda band: affine_silu(band, scale, shift)), axis=1)


# Elements per band of rows (NormSiLU): 8 MiB in float32. Below two bands' worth an activation is
# computed whole, on one stream.
_BAND = 1 << 21


def _bands(x: mx.array) -> list[mx.array]:
    rows = max(1, _BAND // (x.size // x.shape[1]))
    return [x] if rows >= x.shape[1] else [x[:, top:top + rows] for top in range(0, x.shape[1], rows)]
