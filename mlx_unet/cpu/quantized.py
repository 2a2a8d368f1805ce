"""The CPU's QuantizedLinear: nn.QuantizedLinear's parameters, its product through BLAS.

MLX's CPU ``quantized_matmul`` is many times slower than a float32 BLAS product of the same
shape (README.md, "Quantized models", has the figures: ``benchmarks/bench_quantize.py matmul``).
So this layer dequantizes its weight to float32 at each call and multiplies through BLAS: one
pass over the weight per call, which larger token counts amortise. The weights stay quantized in
memory; the float32 copies are transient (MLX may hold a few at once, which the run's memory
estimate counts). On Metal and CUDA quantized matmuls are the fast path, and this kernel is not
used."""

import mlx.core as mx
import mlx.nn as nn


class QuantizedLinear(nn.QuantizedLinear):
    """Takes the place of an ``nn.QuantizedLinear`` (``from_module``), with the same parameters."""

    def __init__(self, module: nn.QuantizedLinear):
        # nn.Module's __init__, not nn.QuantizedLinear's: that draws and quantizes a random weight
        # only to drop it (moving MLX's global random state; see linear.Linear).
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = module.group_size, module.bits, module.mode
        self.weight, self.scales = module.weight, module.scales
        self.biases = module.get("biases")
        if "bias" in module:
            self.bias = module.bias
        self.freeze()

    @classmethod
    def from_module(cls, module: nn.QuantizedLinear) -> "QuantizedLinear":
        return cls(module)

    def dense_weight(self) -> mx.array:
        """The (out, in) weight the quantized one stands for, float32."""
        weight = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size,
                               bits=self.bits, mode=self.mode)
        return weight.astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.astype(mx.float32)
        if "bias" in self:
            y = mx.addmm(self.bias.astype(mx.float32), rows.reshape(-1, x.shape[-1]), self.dense_weight().T)
            y = y.reshape(*x.shape[:-1], -1)
        else:
            y = rows @ self.dense_weight().T
        return y.astype(x.dtype)
