"""GELU, SiLU, CLIP's quick GELU and the attention softmax, fast on MLX's CPU backend.

On Linux, MLX's CPU ``exp`` and ``erf`` cost 25-40 ns an element on one thread, while
arithmetic fused by ``mx.compile`` into one g++-built loop costs well under 1 ns. In an SDXL
forward the built-ins made GELU, SiLU and the softmax over 40% of the time. So on the CPU these
are computed from arithmetic only:

- ``exp``: 2**y = 2**n * 2**f with n = round(y) and f in [-0.5, 0.5]; a polynomial gives 2**f
  and 2**n is written straight into a float's exponent bits.
- ``erf``: a rational function on [-4, 4]; beyond that erf is +-1 to float32 precision.

The coefficients come from ``tools/fit_approximations.py``: 2**f has a relative error under
1e-7 and erf an absolute error under 4e-7 when evaluated in float32, a few units in the last
place, like the built-ins. Half-precision inputs are computed in float32 and rounded once.

Three details of MLX's compiler shape the code: a fused kernel holds at most 11 dependent
operations (so the polynomials use Estrin's scheme, which is shallow, and each function is
split into kernels); a clip or maximum keeps g++ from vectorising the whole loop it is fused
into (so GELU clips in a kernel of its own, and the softmax writes max(x, 0) as arithmetic);
and a bit-cast (``view``) ends a kernel. Rounding uses the 1.5 * 2**23 trick because ``round``
and ``floor`` are library calls there, while add and subtract vectorise.

The modules at the end take the places of the models' activation modules (``cpu.swap``).
"""

import math

import mlx.core as mx
import mlx.nn as nn

# 2**f on [-0.5, 0.5], lowest power first.
_EXP2 = (1.0, 0.6931471824645996, 0.24022647738456726, 0.055503323674201965,
         0.00961843691766262, 0.0013398875016719103, 0.00015353361959569156)
# erf(z) = z * P(z^2) / Q(z^2) on [-4, 4].
_ERF_P = (1.128379225730896, 0.18471036851406097, 0.054332610219717026, 0.0038395309820771217,
          0.00038269272772595286, 4.780551989824744e-06, -1.3666849874027776e-08)
_ERF_Q = (1.0, 0.4970288574695587, 0.11382632702589035, 0.0154535211622715,
          0.001309580053202808, 6.400939309969544e-05)
_ERF_CLIP = 4.0
_ROUNDER = 12582912.0  # 1.5 * 2**23: (y + it) - it rounds y (|y| < 2**22) to an integer
LOG2_E = math.log2(math.e)


def _estrin(c, x: mx.array) -> mx.array:
    """c[0] + c[1] x + ... for 6 or 7 coefficients, in 5 dependent steps (Horner takes 12)."""
    x2 = x * x
    x4 = x2 * x2
    high = c[4] + c[5] * x
    if len(c) == 7:
        high = high + x2 * c[6]
    return (c[0] + c[1] * x) + x2 * (c[2] + c[3] * x) + x4 * high


# ---------------------------------------------------------------------- 2**y, in two kernels


def _exp2_split(y: mx.array) -> tuple[mx.array, mx.array]:
    """y (float32, already within [-126, 127]) -> (f, 2**n's bits as int32)."""
    n = (y + _ROUNDER) - _ROUNDER
    # (n + 127) << 23 computed in float (exact: an integer times a power of two below 2**31),
    # because a float-to-int conversion vectorises and an integer shift here does not.
    return y - n, ((n + 127.0) * 8388608.0).astype(mx.int32)


def _relu(x: mx.array) -> mx.array:
    # max(x, 0) without a branch: MLX's maximum checks for NaN per element, which stops g++
    # from vectorising the whole fused loop. Exact: for x < 0, x + |x| is exactly 0.
    return 0.5 * (x + mx.abs(x))


@mx.compile
def _softmax_split(scores: mx.array, row_max: mx.array) -> tuple[mx.array, mx.array]:
    # Scores are in base 2 (the caller folds log2(e) into the queries). A weight below 2**-64
    # of the row's largest changes no float32 sum; clipped there, products with it in the
    # next matmul stay clear of denormals, which x86 computes slowly.
    shifted = scores - row_max
    return _exp2_split(shifted + _relu(-64.0 - shifted))


@mx.compile
def _exp2_join(f: mx.array, two_n: mx.array) -> mx.array:
    return _estrin(_EXP2, f) * two_n


def softmax_weights(scores: mx.array, axis: int = -1) -> mx.array:
    """For float32 base-2 ``scores``: 2**(scores - their maximum along ``axis``), left
    unnormalised (attention divides its output by the sums instead)."""
    f, bits = _softmax_split(scores, scores.max(axis=axis, keepdims=True))
    return _exp2_join(f, bits.view(mx.float32))


# ---------------------------------------------------------------------- SiLU


@mx.compile
def _silu_split(x: mx.array) -> tuple[mx.array, mx.array]:
    # exp(-x) = 2**(-x log2 e); clipped so 2**n stays a normal float. Far outside the clip
    # 1 + exp(-x) is 1 or so large that x / it is 0 either way.
    return _exp2_split(mx.clip(x.astype(mx.float32) * -LOG2_E, -126.0, 127.0))


@mx.compile
def _silu_join(x: mx.array, f: mx.array, two_n: mx.array) -> mx.array:
    return (x.astype(mx.float32) / (1.0 + _estrin(_EXP2, f) * two_n)).astype(x.dtype)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x), computed as x / (1 + exp(-x))."""
    f, bits = _silu_split(x)
    return _silu_join(x, f, bits.view(mx.float32))


# ---------------------------------------------------------------------- GELU


@mx.compile
def _erf_argument(x: mx.array) -> mx.array:
    """z = x / sqrt(2), clipped to the fitted range: a kernel of its own, because the clip's NaN
    checks keep g++ from vectorising its loop, and fused with the polynomials below it made the
    whole GEGLU about 3x slower (measured on SDXL's shapes)."""
    return mx.clip(x.astype(mx.float32) * math.sqrt(0.5), -_ERF_CLIP, _ERF_CLIP)


@mx.compile
def _erf_ratio(z: mx.array) -> mx.array:
    """P(z^2) / Q(z^2), so that erf(z) = z * ratio, for z from _erf_argument."""
    s = z * z
    return _estrin(_ERF_P, s) / _estrin(_ERF_Q, s)


def _gelu_from_ratio(x: mx.array, z: mx.array, ratio: mx.array) -> mx.array:
    """x * (1 + erf(z)) / 2 in float32, given z = _erf_argument(x) and its _erf_ratio."""
    return x.astype(mx.float32) * (0.5 + 0.5 * (z * ratio))


@mx.compile
def _gelu_join(x: mx.array, z: mx.array, ratio: mx.array) -> mx.array:
    return _gelu_from_ratio(x, z, ratio).astype(x.dtype)


@mx.compile
def _geglu_join(value: mx.array, gate: mx.array, z: mx.array, ratio: mx.array) -> mx.array:
    return (value.astype(mx.float32) * _gelu_from_ratio(gate, z, ratio)).astype(value.dtype)


def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU, torch's default."""
    z = _erf_argument(x)
    return _gelu_join(x, z, _erf_ratio(z))


def geglu(value: mx.array, gate: mx.array) -> mx.array:
    """value * GELU(gate)."""
    z = _erf_argument(gate)
    return _geglu_join(value, gate, z, _erf_ratio(z))


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x), OpenAI CLIP's activation, as silu(1.702 x) / 1.702 in float32, so a
    half-precision input is rounded once, at the end."""
    y = x.astype(mx.float32) * 1.702
    return (silu(y) / 1.702).astype(x.dtype)


# ---------------------------------------------------------------------- the modules swapped in


class SiLU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return silu(x)


class GELU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return gelu(x)


class GatedGELU(nn.Module):
    def __call__(self, value: mx.array, gate: mx.array) -> mx.array:
        return geglu(value, gate)


class QuickGELU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return quick_gelu(x)
