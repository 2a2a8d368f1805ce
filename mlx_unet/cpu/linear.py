"""The CPU's Linear: nn.Linear's parameters, computed the way MLX's CPU backend runs fastest.

MLX's CPU backend has no fast float16/bfloat16 matrix multiply: about 3 GFLOP/s against about
150 in float32 through BLAS on this 2-core machine. On the CPU a half-precision weight is
therefore widened to float32 for the product as the layer is called (``half.float32``: one
layer's weight at a time, so the model stays half-size in memory), and a half-precision input
too, its result rounded back once, which is also more exact (``widen``: the model computes in
float32).

On the CPU a small row count that is not a multiple of 16 is padded with zero rows: OpenBLAS
runs its slow edge kernels on the remainder, and SDXL's 77 text tokens (the cross-attention
keys and values, M=77 K=2048 N=1280) took about 25% longer than 80 rows do.

The weight stays diffusers' row-major (out, in) matrix, which BLAS reads transposed. An
earlier version stored it as its (in, out) transpose, which OpenBLAS's SSE3 kernels packed
quicker; its AVX-512 kernels (``blas.core_type``) pack the row-major weight quicker, which
matters most for the few-row products of a small latent (64 tokens at SDXL's 8x8 level).
``benchmarks/bench_linear_layout.py`` times the two layouts in one forward, interleaved.
"""

import mlx.core as mx
import mlx.nn as nn

from .half import float32


_ROW_BLOCK = 16
# From this many rows on, the remainder is a small share of the work: not worth copying x.
_PAD_ROWS_BELOW = 256


def _padded_rows(x: mx.array) -> int:
    """How many zero rows to append to x's flattened rows before the product (0: none)."""
    rows = x.size // x.shape[-1]
    if rows < _ROW_BLOCK or rows >= _PAD_ROWS_BELOW:
        return 0
    return -rows % _ROW_BLOCK


class Linear(nn.Linear):
    """Takes the place of an ``nn.Linear`` (``from_module``), with the same parameters."""

    def __init__(self, weight: mx.array, bias: mx.array | None = None):
        # nn.Module's __init__, not nn.Linear's: that draws random weights only to drop them,
        # which would move MLX's global random state (a seeded run's noise would then depend on
        # whether the kernels were swapped in).
        nn.Module.__init__(self)
        self.weight = weight
        if bias is not None:
            self.bias = bias

    @classmethod
    def from_module(cls, module: nn.Linear) -> "Linear":
        return cls(module.weight, module.get("bias"))

    def __call__(self, x: mx.array) -> mx.array:
        pad = _padded_rows(x)
        shape = x.shape
        if pad:
            x = mx.pad(x.reshape(-1, shape[-1]), [(0, pad), (0, 0)])
        weight, rows = float32(self.weight), x.astype(mx.float32)
        y = rows @ weight.T if "bias" not in self else mx.addmm(float32(self.bias), rows, weight.T)
        y = y.astype(x.dtype)
        # The first rows of a row-major result are a contiguous prefix: no copy.
        return y[: y.shape[0] - pad].reshape(*shape[:-1], -1) if pad else y
