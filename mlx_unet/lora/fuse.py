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

from dataclasses import dataclass, replace
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .adapters import Adapter, LowRank
from .layers import base_of, torch_shape


@dataclass(frozen=True)
class Lost:
    """The elements of a weight that subtraction does not restore: flat indices and values."""

    indices: mx.array | None = None
    values: mx.array | None = None


def _memory_order(layer: nn.Module) -> tuple[int, ...]:
    """The order the weight's axes lie in memory: the CPU kernels keep theirs laid out for their
    products (``memory_order``: (kh, kw, in, out) for a convolution), other layers row-major."""
    return getattr(type(layer), "memory_order", tuple(range(layer.weight.ndim)))


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def _delta(layer: nn.Module, adapter: Adapter, scale: float, order: tuple[int, ...]) -> mx.array:
    """``scale`` x the adapter's update of ``layer``'s weight, float32, with its axes in the
    weight's memory order and contiguous: all the arithmetic runs on the weight as it lies in
    memory (contiguous passes; the fused weight then needs no re-layout). A low-rank update takes
    the scale in its small down matrix. Fusing and unfusing compute it alike, to the bit."""
    if isinstance(adapter, LowRank):
        adapter = replace(adapter, down=adapter.down.astype(mx.float32) * scale, scale=1.0)
        delta = adapter.update(torch_shape(layer))
    else:
        delta = adapter.update(torch_shape(layer)) * scale
    if delta.ndim == 4:
        delta = delta.transpose(0, 2, 3, 1)  # MLX's (out, kh, kw, in)
    return mx.contiguous(delta.transpose(order))


# Single passes, compiled. No multiply in them: a compiler could contract one with the add into
# one rounding, and the two directions would then round differently.
@partial(mx.compile, shapeless=True)
def _add(weight: mx.array, delta: mx.array) -> mx.array:
    return (weight.astype(mx.float32) + delta).astype(weight.dtype)


@partial(mx.compile, shapeless=True)
def _subtract(weight: mx.array, delta: mx.array) -> mx.array:
    return (weight.astype(mx.float32) - delta).astype(weight.dtype)


@partial(mx.compile, shapeless=True)
def _lost(fused: mx.array, delta: mx.array, weight: mx.array) -> mx.array:
    """Where unfusing (``_subtract``, the same expression) would not give ``weight`` back. ``!=``
    misses -0.0 (restored as +0.0): zeros are recorded whatever their sign; NaN != NaN records
    NaN weights too."""
    return (_subtract(fused, delta) != weight) | (weight == 0)


def _set_weight(layer: nn.Module, in_memory_order: mx.array, order: tuple[int, ...]) -> None:
    # Transposed back to the weight's shape, a view: the memory stays as computed.
    layer.weight = in_memory_order.transpose(_inverse(order))
    mx.eval(layer.weight)


def fuse(layer: nn.Module, adapter: Adapter, scale: float) -> Lost:
    """Add ``scale`` x the adapter's delta to the weight of ``layer`` (its base, if wrapped)."""
    layer = base_of(layer)
    order = _memory_order(layer)
    weight = layer.weight.transpose(order)
    delta = _delta(layer, adapter, scale * adapter.scale, order)
    fused = _add(weight, delta)
    lost = _lost(fused, delta, weight)
    mx.eval(fused, lost)
    record = Lost()
    found = np.flatnonzero(np.asarray(lost))  # flat indices in memory order, as unfuse reads them
    if found.size:
        indices = mx.array(found.astype(np.uint32))
        record = Lost(indices, weight.reshape(-1)[indices])
        mx.eval(record.values)
    _set_weight(layer, fused, order)
    return record


def unfuse(layer: nn.Module, adapter: Adapter, scale: float, lost: Lost) -> None:
    """Undo ``fuse(layer, adapter, scale)``, the last fuse into this weight, bit for bit."""
    layer = base_of(layer)
    order = _memory_order(layer)
    weight = layer.weight.transpose(order)
    restored = _subtract(weight, _delta(layer, adapter, scale * adapter.scale, order))
    if lost.indices is not None:
        # Held by nothing else, so MLX writes the recorded values into its buffer in place.
        flat = restored.reshape(-1)
        del restored
        flat[lost.indices] = lost.values
        restored = flat.reshape(weight.shape)
    _set_weight(layer, restored, order)
