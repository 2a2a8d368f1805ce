"""nn.Linear, with half-precision products computed in float32 on the CPU.

MLX's CPU backend has no fast float16/bfloat16 matrix multiply: about 3 GFLOP/s against about
150 in float32 through BLAS on this 2-core machine. On the CPU a half-precision Linear therefore
widens its input and weight to float32 for the product (the weight one layer at a time, so the
model stays half-size in memory) and rounds the result back once, which is also more exact.
On Metal and CUDA half-precision matmuls are native and are used as they are.
"""

import mlx.core as mx
import mlx.nn as nn

from .activations import on_cpu


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == mx.float32 or not on_cpu():
            return super().__call__(x)
        weight = self.weight.astype(mx.float32)
        if "bias" in self:
            y = mx.addmm(self.bias.astype(mx.float32), x.astype(mx.float32), weight.T)
        else:
            y = x.astype(mx.float32) @ weight.T
        return y.astype(x.dtype)
