"""The CPU's Linear: nn.Linear's parameters, computed the way MLX's CPU backend runs fastest.

MLX's CPU backend has no fast float16/bfloat16 matrix multiply: about 3 GFLOP/s against about
150 in float32 through BLAS on this 2-core machine. On the CPU a half-precision Linear therefore
widens its input and weight to float32 for the product (the weight one layer at a time, so the
model stays half-size in memory) and rounds the result back once, which is also more exact.

On the CPU a small row count that is not a multiple of 16 is padded with zero rows: OpenBLAS
runs its slow edge kernels on the remainder, and SDXL's 77 text tokens (the cross-attention
keys and values, M=77 K=2048 N=1280) took about 25% longer than 80 rows do.

On the CPU the weight is also *stored* transposed: still the (out, in) matrix of diffusers'
checkpoints, with the same name and shape, but laid out in memory as its (in, out) transpose.
OpenBLAS re-packs the weight on every call, and with few rows (64 tokens at SDXL's 8x8 level, 77
text tokens) that packing, which streams the whole weight from memory, is a large share of the
product. Packing this layout is quicker: the SDXL forward runs about 9% faster at a 32x32
latent and 6% at 64x64 (medians of interleaved forwards: 4.85 -> 4.40 s, 17.39 -> 16.37 s), with
bit-identical results. ``load_weights`` lays loaded weights out so (through ``laid_out``);
files keep diffusers' layout.
"""

import mlx.core as mx
import mlx.nn as nn


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
        self.weight = self.laid_out(weight)
        if bias is not None:
            self.bias = bias

    @classmethod
    def from_module(cls, module: nn.Linear) -> "Linear":
        return cls(module.weight, module.get("bias"))

    # The weight's axes in the order they lie in memory: (in, out).
    memory_order = (1, 0)

    @staticmethod
    def laid_out(weight: mx.array) -> mx.array:
        """``weight`` (out, in), unchanged in value and shape, laid out in memory as its transpose."""
        return mx.contiguous(weight.T).T

    def __call__(self, x: mx.array) -> mx.array:
        pad = _padded_rows(x)
        shape = x.shape
        if pad:
            x = mx.pad(x.reshape(-1, shape[-1]), [(0, pad), (0, 0)])
        if x.dtype == mx.float32:
            y = super().__call__(x)
        else:
            weight = self.weight.astype(mx.float32)
            if "bias" in self:
                y = mx.addmm(self.bias.astype(mx.float32), x.astype(mx.float32), weight.T)
            else:
                y = x.astype(mx.float32) @ weight.T
            y = y.astype(x.dtype)
        # The first rows of a row-major result are a contiguous prefix: no copy.
        return y[: y.shape[0] - pad].reshape(*shape[:-1], -1) if pad else y
