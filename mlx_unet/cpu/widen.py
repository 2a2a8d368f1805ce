"""A half-precision model held in float32 for a run on the CPU, and put back after it.

MLX's CPU backend has no fast half-precision arithmetic: the CPU kernels widen each half weight
to float32 at every call (2.6 G weights per SDXL step, memory-bound), and every elementwise
operation on half activations converts each element in software. An SDXL float16 step took
1.6x the float32 one on this class of CPU. ``widened(model)`` casts the model's half-precision
parameters to float32 once, in place, for a ``with`` block (a sampling run): the model's dtype
is then float32, so the run computes in float32 from the half-precision weights' values (more
exact than computing in half precision, not bit-identical to it), and afterwards each parameter
is narrowed back, which is exact, so the model comes back bit for bit. The price is memory and
the casts: float32's size during the block, which is why runs do it only where that fits
(``pipelines.run.RunSettings.widen_weights``). Quantized layers are left as they are.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

HALF = (mx.float16, mx.bfloat16)


def half_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of each half-precision parameter of ``model`` outside quantized layers."""
    found = []

    def walk(module: nn.Module) -> None:
        if isinstance(module, nn.QuantizedLinear):
            return
        for name, value in module.items():
            if isinstance(value, mx.array) and value.dtype in HALF:
                found.append((module, name))
        for child in module.children().values():
            for item in child if isinstance(child, list) else [child]:
                if isinstance(item, nn.Module):
                    walk(item)

    walk(model)
    return found


def widening_bytes(model: nn.Module) -> int:
    """What ``widened(model)`` adds to the memory the parameters take."""
    return sum(2 * module[name].size for module, name in half_parameters(model))


def _cast(module: nn.Module, name: str, dtype: mx.Dtype) -> None:
    value = module[name].astype(dtype)
    if name == "weight" and hasattr(type(module), "laid_out"):
        value = type(module).laid_out(value)  # a CPU kernel's memory layout, which a cast may not keep
    module[name] = value
    mx.eval(value)  # one parameter at a time: both copies coexist for one parameter only


@contextmanager
def widened(model: nn.Module, narrow_back: bool = True) -> Iterator[int]:
    """``model``'s half-precision parameters in float32 inside the block, back in their own
    dtypes after it (by an exception too); yields how many were widened. ``narrow_back=False``
    leaves them in float32, for a caller that drops the model straight after the block."""
    parameters = half_parameters(model)
    dtypes = [module[name].dtype for module, name in parameters]
    done = []
    try:
        for module, name in parameters:
            _cast(module, name, mx.float32)
            done.append((module, name))
        yield len(parameters)
    finally:
        if narrow_back:
            for (module, name), dtype in zip(done, dtypes):
                _cast(module, name, dtype)
