"""Fused mode: W += scale * delta in the layer's own weight, undone bit for bit.

Subtracting the delta again is not exact: round(round(W + d) - d) is W except where the sum
rounded across a power of two (or to a tie), and where W is -0.0. So fusing records which elements
subtraction would not restore, and their original values: few, usually (none where |d| << |W|).
Keeping the original weights instead would cost as much memory again as the layers the LoRA
touches (about 40% of the SDXL UNet for a LoRA on every attention layer).

The arithmetic is float32 whatever the weight's dtype (half-precision weights are rounded once).
Restoring needs the delta computed again exactly as when fusing: the same factors, the same
operations, so the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .adapters import Adapter
from .layers import base_of, torch_shape

_BITS = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}


@dataclass(frozen=True)
class Lost:
    """The elements of a weight that subtraction does not restore: flat indices and values."""

    indices: mx.array | None = None
    values: mx.array | None = None


def _scaled_delta(layer: nn.Module, adapter: Adapter, scale: float) -> mx.array:
    """``scale`` x the adapter's delta for ``layer``'s weight, float32, in MLX's layout (convolution
    kernels (out, kh, kw, in))."""
    delta = adapter.delta(torch_shape(layer)) * scale
    return delta.transpose(0, 2, 3, 1) if delta.ndim == 4 else delta


def _set_weight(layer: nn.Module, weight: mx.array) -> None:
    # The CPU kernels keep their weights laid out for their products (cpu/linear.py, cpu/conv.py).
    laid_out = getattr(type(layer), "laid_out", None)
    layer.weight = laid_out(weight) if laid_out is not None else weight
    mx.eval(layer.weight)


def _bits(a: mx.array) -> mx.array:
    return a.view(_BITS[a.dtype]) if a.dtype in _BITS else a


def fuse(layer: nn.Module, adapter: Adapter, scale: float) -> Lost:
    """Add ``scale`` x the adapter's delta to the weight of ``layer`` (its base, if wrapped)."""
    layer = base_of(layer)
    weight = layer.weight
    delta = _scaled_delta(layer, adapter, scale)
    fused = (weight.astype(mx.float32) + delta).astype(weight.dtype)
    restored = (fused.astype(mx.float32) - delta).astype(weight.dtype)
    lost = _bits(restored) != _bits(weight)
    count = lost.sum()
    mx.eval(fused, count)
    record = Lost()
    if count.item():
        indices = mx.array(np.flatnonzero(np.array(lost)).astype(np.uint32))
        record = Lost(indices, weight.reshape(-1)[indices])
        mx.eval(record.values)
    _set_weight(layer, fused)
    return record


def unfuse(layer: nn.Module, adapter: Adapter, scale: float, lost: Lost) -> None:
    """Undo ``fuse(layer, adapter, scale)``, the last fuse into this weight, bit for bit."""
    layer = base_of(layer)
    weight = layer.weight
    restored = (weight.astype(mx.float32) - _scaled_delta(layer, adapter, scale)).astype(weight.dtype)
    if lost.indices is not None:
        flat = restored.reshape(-1)
        flat[lost.indices] = lost.values
        restored = flat.reshape(weight.shape)
    _set_weight(layer, restored)
