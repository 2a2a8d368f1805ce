"""Where LoRAs meet the model: its adaptable layers by path, and the live wrapper.

An adaptable layer is a Linear or Conv2d of MLX's (``nn.Linear``, ``nn.Conv2d``), their CPU
kernels (subclasses) and ``nn.QuantizedLinear``. A live LoRA puts a :class:`LoRALayer` in the
layer's place, which holds the layer as ``base`` and adds each branch's output; the model files
know nothing of it. A fused LoRA changes the base layer's weight (``fuse.py``).
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from .. import cpu
from .adapters import ConvGeometry

_LAYERS = (nn.Linear, nn.Conv2d, nn.QuantizedLinear)


class LoRALayer(nn.Module):
    """``base(x) + sum(scale_i * branch_i(x))``. Each branch carries its ``scale`` as an array,
    so that changing it needs no new trace of a compiled forward (``mx.compile`` reads arrays at
    every call but bakes Python numbers in)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.branches: list[nn.Module] = []

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for branch in self.branches:
            y = y + (branch(x) * branch.scale).astype(y.dtype)
        return y


def adaptable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of every layer a LoRA can update; a live-wrapped one by its own path (its
    base and branches are not themselves targets)."""
    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.children().items():
            items = enumerate(child) if isinstance(child, list) else [(None, child)]
            for index, item in items:
                if not isinstance(item, nn.Module):
                    continue
                path = f"{prefix}{name}" if index is None else f"{prefix}{name}.{index}"
                if isinstance(item, (LoRALayer, *_LAYERS)):
                    yield path, item
                else:
                    yield from walk(item, path + ".")
    yield from walk(model, "")


def base_of(layer: nn.Module) -> nn.Module:
    return layer.base if isinstance(layer, LoRALayer) else layer


def torch_shape(layer: nn.Module) -> tuple[int, ...]:
    """The layer's weight shape in PyTorch's layout (the LoRA files'): (out, in) or (out, in, kh, kw)."""
    layer = base_of(layer)
    if isinstance(layer, nn.QuantizedLinear):
        out, packed = layer.weight.shape
        return out, packed * 32 // layer.bits
    shape = tuple(layer.weight.shape)
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape


def geometry(layer: nn.Module) -> ConvGeometry | None:
    layer = base_of(layer)
    return ConvGeometry(layer.stride[0], layer.padding[0]) if isinstance(layer, nn.Conv2d) else None


def dtype_of(layer: nn.Module) -> mx.Dtype:
    """The dtype the layer computes in (a quantized layer's: its scales')."""
    layer = base_of(layer)
    return layer.scales.dtype if isinstance(layer, nn.QuantizedLinear) else layer.weight.dtype


def _parent(model: nn.Module, path: str) -> tuple[nn.Module | list, str | int]:
    *parents, last = path.split(".")
    node = model
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, int(last) if isinstance(node, list) else last


def layer_at(model: nn.Module, path: str) -> nn.Module:
    parent, key = _parent(model, path)
    return parent[key]


def _put(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent, key = _parent(model, path)
    parent[key] = layer


def attach(model: nn.Module, path: str, branch: nn.Module) -> None:
    """Add ``branch`` (with its ``scale``) to the layer at ``path``, wrapping it first. The
    branch gets the CPU kernels when its base layer has them."""
    layer = layer_at(model, path)
    if not isinstance(layer, LoRALayer):
        layer = LoRALayer(layer)
        _put(model, path, layer)
    if cpu.is_accelerated(layer.base):
        cpu.accelerate(branch)
    layer.branches.append(branch)


def detach(model: nn.Module, path: str, branch: nn.Module) -> None:
    """Take ``branch`` off the layer at ``path``; the last one leaves the base layer in its place."""
    layer = layer_at(model, path)
    layer.branches = [b for b in layer.branches if b is not branch]
    if not layer.branches:
        _put(model, path, layer.base)
