"""Half precision on the CPU: half-precision weights, float32 arithmetic.

MLX's CPU backend has no fast half-precision arithmetic: a half-precision matrix product runs
at a few GFLOP/s, and every elementwise operation on half activations converts each element in
software. So on the CPU kernels a half-precision model computes in float32 from its weights'
values, which is also more exact than half precision:

- The kernels' weight matrices (``Linear``, ``Conv2d``: nearly all of a model's parameters) stay
  in half precision and are widened to float32 one layer at a time as they are used
  (``half.float32``); everything else (norms, biases, embeddings: 0.1% of SDXL's UNet, 12% of
  its text encoders) is held in float32 (``hold_outside_kernels``; a model loaded with the
  kernels in loads those in float32 at once, ``held_in_float32``), so activations are float32
  from the start and the model's dtype reads float32. The model takes half of float32's memory.
- ``widened(model)`` casts the kernels' half weights to float32 too, in place, for a ``with``
  block (a sampling run) and narrows them back after it, which is exact: the model comes back
  bit for bit (or stays in float32, for a caller that frees it next). It saves the per-call
  widening (2.6 G weights per SDXL forward) at float32's memory for the block
  (``pipelines.run.RunSettings.widen_weights``). Both compute the same values. Quantized layers
  are left as they are.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from .conv import Conv2d
from .half import HALF, float32
from .heap import prefault, reused_heap
from .linear import Linear


def half_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of each half-precision parameter of ``model`` outside quantized layers."""
    return [(module, name) for _, module in model.named_modules() if not isinstance(module, nn.QuantizedLinear)
            for name, value in module.items() if isinstance(value, mx.array) and value.dtype in HALF]


def widening_bytes(model: nn.Module) -> int:
    """What ``widened(model)`` adds to the memory the parameters take."""
    return sum(2 * module[name].size for module, name in half_parameters(model))


def _cast(module: nn.Module, name: str, dtype: mx.Dtype) -> None:
    value = float32(module[name]) if dtype == mx.float32 else module[name].astype(dtype)
    if name == "weight" and hasattr(type(module), "laid_out"):
        value = type(module).laid_out(value)  # a CPU kernel's memory layout, which a cast may not keep
    module[name] = value
    mx.eval(value)  # one parameter at a time: both copies coexist for one parameter only


def _outside_kernels(module: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``module`` is held in float32 in a half-precision model:
    all but the CPU kernels' weight matrices, which they widen as they use them."""
    return not (name == "weight" and isinstance(module, (Linear, Conv2d)))


def hold_outside_kernels(model: nn.Module) -> nn.Module:
    """``model`` (in place) with every half-precision parameter held in float32 but the CPU
    kernels' weight matrices and quantized layers: a half-precision model then computes in
    float32, at about half of float32's memory."""
    for module, name in half_parameters(model):
        if _outside_kernels(module, name):
            _cast(module, name, mx.float32)
    return model


def held_in_float32(model: nn.Module) -> set[str]:
    """The parameters (dotted names) that ``hold_outside_kernels`` holds in float32 where they
    are in half precision: so that a model with the kernels in can load them in float32 at once
    (``weights.load_weights``), and not in half precision to be cast after."""
    return {f"{path}.{name}" if path else name for path, module in model.named_modules()
            if not isinstance(module, nn.QuantizedLinear)
            for name, value in module.items() if isinstance(value, mx.array) and _outside_kernels(module, name)}


@contextmanager
def widened(model: nn.Module, narrow_back: bool = True) -> Iterator[int]:
    """``model``'s half-precision parameters in float32 inside the block, back in their own
    dtypes after it (by an exception too), or left in float32 where ``narrow_back`` is False (for
    a caller that frees the model next: narrowing SDXL's UNet back takes seconds); yields how
    many were widened."""
    parameters = half_parameters(model)
    dtypes = [module[name].dtype for module, name in parameters]
    done = []
    with reused_heap():
        # The float32 copies need this much memory beyond the half weights they replace. Fresh
        # pages faulted in one at a time on one thread took SDXL's first widening from 1.2 s to
        # 16.2 s in this VM (README: "Fresh memory"); touched first on every core, 6.9 + 1.5 s.
        prefault(widening_bytes(model))
        try:
            for module, name in parameters:
                _cast(module, name, mx.float32)
                done.append((module, name))
            yield len(parameters)
        finally:
            for (module, name), dtype in zip(done if narrow_back else (), dtypes):
                _cast(module, name, dtype)
