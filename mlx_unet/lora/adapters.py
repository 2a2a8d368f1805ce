"""One layer's update as LoRA files store it: the factors, and what they make.

Each kind computes, from its factors in float32:

- ``delta(shape)``: the dense update of the layer's weight, in PyTorch's layout (``(out, in)``
  or ``(out, in, kh, kw)``; the files' layout), with the file's own alpha scale in it;
- ``branch(geometry, dtype)``: layers computing the same update from the layer's input, for live
  mode (``layers.LoRALayer`` adds their output to the base layer's).

Kinds: :class:`LowRank` (LoRA, kohya's LoCon convolutions, LyCORIS' Tucker core ``lora_mid``),
:class:`Hadamard` (LyCORIS LoHa) and :class:`Kronecker` (LyCORIS LoKr). LoHa and LoKr have no
cheap low-rank form, so their branch holds their dense delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from ..finite import all_finite


@dataclass(frozen=True)
class ConvGeometry:
    """Stride and padding of the convolution a branch runs beside (None for a Linear layer)."""

    stride: int
    padding: int


def _f32(a: mx.array | None) -> mx.array | None:
    return None if a is None else a.astype(mx.float32)


def _linear(weight: mx.array) -> nn.Linear:
    """An ``nn.Linear`` (no bias) holding ``weight`` (out, in), built without nn.Linear's random
    initialisation, which would move MLX's global random state (a seeded image would then depend
    on whether a LoRA was loaded)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.weight = weight
    return layer


def _conv(weight: mx.array, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    """An ``nn.Conv2d`` (no bias) holding ``weight`` in PyTorch's (out, in, kh, kw), laid out as
    MLX's (out, kh, kw, in); built without a random draw, as ``_linear``."""
    layer = nn.Conv2d.__new__(nn.Conv2d)
    nn.Module.__init__(layer)
    layer.weight = mx.contiguous(weight.transpose(0, 2, 3, 1))
    layer.stride, layer.padding, layer.dilation, layer.groups = (stride, stride), (padding, padding), (1, 1), 1
    return layer


def _dense(delta: mx.array, geometry: ConvGeometry | None, dtype: mx.Dtype) -> nn.Module:
    delta = delta.astype(dtype)
    if geometry is None:
        return _linear(delta.reshape(delta.shape[0], -1))
    return _conv(delta, geometry.stride, geometry.padding)


class Adapter:
    """One layer's update. ``scale`` is the file's own (alpha / rank, or what the format says);
    ``factors`` every tensor it holds (for the finiteness check)."""

    scale: float

    def sizes(self) -> tuple[int, int]:
        """(out, in x kernel): the size of the matrix the update makes, before any reshape."""
        raise NotImplementedError

    def factors(self) -> list[mx.array]:
        raise NotImplementedError

    def update(self, shape: tuple[int, ...]) -> mx.array:
        """The update without ``scale``, float32, reshaped to ``shape``."""
        raise NotImplementedError

    def delta(self, shape: tuple[int, ...]) -> mx.array:
        return self.update(shape) * self.scale

    def branch(self, shape: tuple[int, ...], geometry: ConvGeometry | None, dtype: mx.Dtype) -> nn.Module:
        """Layers computing ``x -> update applied to x`` (without ``scale``) for a layer whose
        weight has (PyTorch-layout) ``shape``."""
        return _dense(self.update(shape), geometry, dtype)

    def rows(self, index: int, count: int) -> "Adapter":
        """The update of the ``index``-th of ``count`` equal row blocks of this one's output (one of
        q, k, v when the file's layer is open_clip's fused in_proj)."""
        return RowBlock(self, index, count)

    def problem(self) -> str | None:
        """Why these factors cannot make an update (inner sizes that differ), or None."""
        return None


@dataclass(frozen=True)
class LowRank(Adapter):
    """LoRA: ``up @ down``. ``down`` is (r, in) or (r, in, kh, kw) for a convolution (LoCon: the
    kernel is down's, and up is 1x1); with LyCORIS' Tucker core ``mid`` (r, r, kh, kw), down and
    up are both 1x1 and the kernel is mid's: delta[o, i] = sum up[o, p] mid[p, q] down[q, i]."""

    down: mx.array
    up: mx.array
    scale: float
    mid: mx.array | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def sizes(self) -> tuple[int, int]:
        kernel = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
        return self.up.shape[0], self.down.shape[1] * math.prod(kernel)

    def factors(self) -> list[mx.array]:
        return [a for a in (self.down, self.up, self.mid) if a is not None]

    def problem(self) -> str | None:
        r = self.rank
        if self.up.ndim not in (2, 4) or self.up.shape[1] != r or math.prod(self.up.shape[2:]) != 1:
            return (f"its up matrix {tuple(self.up.shape)} does not fit its down matrix {tuple(self.down.shape)} "
                    f"(rank {r})")
        if self.mid is not None and (self.mid.ndim != 4 or self.mid.shape[:2] != (r, r)
                                     or math.prod(self.down.shape[2:]) != 1):
            return f"its Tucker core {tuple(self.mid.shape)} does not fit rank {r} and down {tuple(self.down.shape)}"
        return None

    def update(self, shape: tuple[int, ...]) -> mx.array:
        out, r = self.up.shape[0], self.rank
        up, down = _f32(self.up).reshape(out, r), _f32(self.down).reshape(r, -1)
        if self.mid is None:
            return (up @ down).reshape(shape)
        return mx.einsum("op,pqhw,qi->oihw", up, _f32(self.mid), down).reshape(shape)

    def branch(self, shape: tuple[int, ...], geometry: ConvGeometry | None, dtype: mx.Dtype) -> nn.Module:
        out, r = self.up.shape[0], self.rank
        up, down = self.up.astype(dtype), self.down.astype(dtype)
        if geometry is None:
            return LowRankBranch([_linear(down.reshape(r, -1)), _linear(up.reshape(out, r))])
        kernel = shape[2:]
        if self.mid is None:
            return LowRankBranch([_conv(down.reshape(r, shape[1], *kernel), geometry.stride, geometry.padding),
                                  _conv(up.reshape(out, r, 1, 1))])
        return LowRankBranch([_conv(down.reshape(r, shape[1], 1, 1)),
                              _conv(self.mid.astype(dtype), geometry.stride, geometry.padding),
                              _conv(up.reshape(out, r, 1, 1))])

    def rows(self, index: int, count: int) -> "LowRank":
        size = self.up.shape[0] // count
        return replace(self, up=self.up[index * size:(index + 1) * size])


class LowRankBranch(nn.Module):
    """down (then mid), then up: layers applied in turn."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


def _tucker(core: mx.array, first: mx.array, second: mx.array) -> mx.array:
    """LyCORIS' Tucker product: core (r, r, kh, kw), first (r, out), second (r, in) -> (out, in, kh, kw)."""
    return mx.einsum("ijhw,ip,jr->prhw", core, first, second)


@dataclass(frozen=True)
class Hadamard(Adapter):
    """LyCORIS LoHa: (w1a @ w1b) * (w2a @ w2b), the element-wise product of two low-rank
    matrices; with Tucker cores t1/t2 (convolutions) each factor is ``_tucker(t, wa, wb)``."""

    w1a: mx.array
    w1b: mx.array
    w2a: mx.array
    w2b: mx.array
    scale: float
    t1: mx.array | None = None
    t2: mx.array | None = None

    def sizes(self) -> tuple[int, int]:
        if self.t1 is not None:  # w1a is (r, out) and w1b (r, in) around the core
            return self.w1a.shape[1], self.w1b.shape[1] * math.prod(self.t1.shape[2:])
        return self.w1a.shape[0], self.w1b.shape[-1] if self.w1b.ndim == 2 else math.prod(self.w1b.shape[1:])

    def factors(self) -> list[mx.array]:
        return [a for a in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2) if a is not None]

    def problem(self) -> str | None:
        if (self.t1 is None) != (self.t2 is None):
            return "it has one Tucker core (hada_t1/hada_t2) without the other"
        pairs = ((self.w1a, self.w1b, self.t1), (self.w2a, self.w2b, self.t2))
        for a, b, core in pairs:
            if a.ndim != 2 or b.ndim < 2:
                return f"its factors {tuple(a.shape)} and {tuple(b.shape)} are not matrices"
            inner = a.shape[0] if core is not None else a.shape[1]
            if inner != b.shape[0] or (core is not None and core.shape[:2] != (inner, inner)):
                return f"its factors {tuple(a.shape)} and {tuple(b.shape)} have different ranks"
        return None

    def _factor(self, a: mx.array, b: mx.array, core: mx.array | None, shape: tuple[int, ...]) -> mx.array:
        if core is not None:
            return _tucker(_f32(core), _f32(a), _f32(b))
        return (_f32(a) @ _f32(b).reshape(b.shape[0], -1)).reshape(shape)

    def update(self, shape: tuple[int, ...]) -> mx.array:
        w1 = self._factor(self.w1a, self.w1b, self.t1, shape)
        w2 = self._factor(self.w2a, self.w2b, self.t2, shape)
        return (w1 * w2).reshape(shape)


@dataclass(frozen=True)
class Kronecker(Adapter):
    """LyCORIS LoKr: kron(w1, w2). Each factor is stored whole (``lokr_w1``) or as two low-rank
    matrices (``lokr_w1_a @ lokr_w1_b``); w2 of a convolution holds the kernel, or a Tucker core
    ``t2`` with w2a (r, out) and w2b (r, in) around it."""

    w1: mx.array | tuple[mx.array, mx.array]
    w2: mx.array | tuple[mx.array, mx.array]
    scale: float
    t2: mx.array | None = None

    def _w1(self) -> mx.array:
        return _f32(self.w1) if not isinstance(self.w1, tuple) else _f32(self.w1[0]) @ _f32(self.w1[1])

    def _w2(self) -> mx.array:
        if not isinstance(self.w2, tuple):
            return _f32(self.w2)
        a, b = self.w2
        if self.t2 is not None:
            return _tucker(_f32(self.t2), _f32(a), _f32(b))
        return _f32(a) @ _f32(b)

    def _shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        w1 = self.w1.shape if not isinstance(self.w1, tuple) else (self.w1[0].shape[0], self.w1[1].shape[1])
        if not isinstance(self.w2, tuple):
            return w1, tuple(self.w2.shape)
        a, b = self.w2
        if self.t2 is not None:
            return w1, (a.shape[1], b.shape[1], *self.t2.shape[2:])
        return w1, (a.shape[0], b.shape[1])

    def sizes(self) -> tuple[int, int]:
        w1, w2 = self._shapes()
        return w1[0] * w2[0], w1[1] * math.prod(w2[1:])

    def factors(self) -> list[mx.array]:
        parts = [*(self.w1 if isinstance(self.w1, tuple) else (self.w1,)),
                 *(self.w2 if isinstance(self.w2, tuple) else (self.w2,))]
        return parts + ([self.t2] if self.t2 is not None else [])

    def problem(self) -> str | None:
        for name, factor in (("w1", self.w1), ("w2", self.w2)):
            if isinstance(factor, tuple):
                a, b = factor
                inner_a = a.shape[0] if (name == "w2" and self.t2 is not None) else a.shape[-1]
                if a.ndim != 2 or b.ndim != 2 or inner_a != b.shape[0]:
                    return f"its lokr_{name}_a {tuple(a.shape)} and lokr_{name}_b {tuple(b.shape)} have different ranks"
        return None

    def update(self, shape: tuple[int, ...]) -> mx.array:
        w1, w2 = self._w1(), self._w2()
        # kron(w1, w2) with w2's kernel axes kept: (a, b) x (c, d, ...) -> (a*c, b*d, ...).
        a, b = w1.shape
        c, d = w2.shape[:2]
        kernel = w2.shape[2:]
        product = w1.reshape(a, 1, b, 1, *(1,) * len(kernel)) * w2.reshape(1, c, 1, d, *kernel)
        return product.reshape(shape)


@dataclass(frozen=True)
class RowBlock(Adapter):
    """Rows ``index``-th of ``count`` of another adapter's update (open_clip's fused in_proj)."""

    whole: Adapter
    index: int
    count: int

    @property
    def scale(self) -> float:
        return self.whole.scale

    def sizes(self) -> tuple[int, int]:
        out, inner = self.whole.sizes()
        return out // self.count, inner

    def factors(self) -> list[mx.array]:
        return self.whole.factors()

    def update(self, shape: tuple[int, ...]) -> mx.array:
        rows = self.whole.sizes()[0] // self.count
        whole = self.whole.update((rows * self.count, *shape[1:]))
        return whole[self.index * rows:(self.index + 1) * rows]


def check_fits(adapter: Adapter, shape: tuple[int, ...], name: str) -> str | None:
    """Why ``adapter`` cannot update a weight of (PyTorch-layout) ``shape``, or None. A 1x1 kernel
    and a matrix are the same layer (files give either for SD 1.x's 1x1 projections)."""
    problem = adapter.problem()
    if problem is not None:
        return f"{name}: {problem}"
    out, inner = adapter.sizes()
    if (out, inner) != (shape[0], math.prod(shape[1:])):
        width = "x".join(map(str, shape))
        return f"{name} makes a {out}x{inner} update for a {width} weight"
    if isinstance(adapter, LowRank) and adapter.mid is None and adapter.down.ndim == 4 and len(shape) == 4 \
            and tuple(adapter.down.shape[2:]) != tuple(shape[2:]):
        kernel = "x".join(map(str, adapter.down.shape[2:]))
        return f"{name} has a {kernel} kernel for a {shape[2]}x{shape[3]} convolution"
    return None


def nonfinite(adapter: Adapter) -> bool:
    return not all(all_finite(f).item() for f in adapter.factors())
