"""``accelerate(model)``: the one step that puts the CPU kernels into a model built from plain MLX.

The model files use MLX's own layers (``nn.Linear``, ``nn.Conv2d``, ``nn.SiLU``, ``nn.GELU``,
``mx.fast`` attention; ``nn.QuantizedLinear`` in quantized models): the code a Mac or a CUDA
machine runs. On the CPU those are slow
(see each kernel's module), so this pass replaces each such module, wherever it sits in the
tree, by its CPU counterpart with the same parameters, laid out in memory for the CPU's products.
Names, shapes and values of every parameter stay as they are, so weights load and save alike.

Only the exact classes in ``_SWAPS`` are replaced. Anything else is walked into: a wrapper
around a layer (a LoRA layer holding its base ``nn.Linear``, say) keeps its own code and gets the
CPU kernel for the layer inside it; a layer of another class (a grouped convolution, say) is left
as MLX computes it. A few containers (``_CONTAINERS``: the up- and downsamplers, the VAEs' encoders
and decoders) are walked into and then replaced by CPU versions holding the same children. And where a
module's SiLU only ever reads a GroupNorm's output (``_NORM_SILU``), the pair is fused: the norm
becomes a ``norm.NormSiLU`` and the SiLU an ``nn.Identity``, so the model's forward is unchanged.
"""

from __future__ import annotations

import os
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..models import tiny_vae, vae
from ..models.attention import GatedGELU, ScaledDotProductAttention
from ..models.clip import QuickGELU
from ..models.norm import GroupNorm as PlainGroupNorm
from ..models.resnet import Downsample2D as PlainDownsample2D
from ..models.resnet import ResnetBlock2D
from ..models.resnet import Upsample2D as PlainUpsample2D
from ..models.unet import UNet2DConditionModel
from . import activations
from .attention import ChunkedAttention
from .conv import Conv2d
from .downsample import Downsample2D
from .linear import Linear
from .norm import GroupNorm, NormSiLU
from .quantized import QuantizedLinear
from .upsample import Upsample2D
from .vae import Decoder, DecoderTiny, Encoder, EncoderTiny
from .widen import hold_outside_kernels

ENV_SWITCH = "MLX_UNET_CPU_KERNELS"


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def kernels_enabled(requested: bool | None = None) -> bool:
    """Whether to apply the CPU kernels: ``requested`` when given; otherwise on the CPU, unless
    the environment sets ``MLX_UNET_CPU_KERNELS=0`` (to run the Metal/CUDA code path here)."""
    if requested is not None:
        return requested
    return on_cpu() and os.environ.get(ENV_SWITCH, "1") != "0"


def computes_in(dtype: mx.Dtype, cpu_kernels: bool | None = None) -> mx.Dtype:
    """The dtype a model loaded in ``dtype`` computes in and returns: float32 on the CPU kernels,
    which compute a half-precision model in float32 (``widen``); else ``dtype``."""
    return mx.float32 if kernels_enabled(cpu_kernels) else dtype


def _conv(module: nn.Conv2d) -> nn.Module:
    return Conv2d.from_module(module) if Conv2d.supports(module) else module


_SWAPS: dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.Linear: Linear.from_module,
    nn.Conv2d: _conv,
    nn.SiLU: lambda _: activations.SiLU(),
    nn.GELU: lambda m: activations.GELU() if m._approx == "none" else m,
    QuickGELU: lambda _: activations.QuickGELU(),
    GatedGELU: lambda _: activations.GatedGELU(),
    ScaledDotProductAttention: lambda _: ChunkedAttention(),
    nn.QuantizedLinear: QuantizedLinear.from_module,
    PlainGroupNorm: GroupNorm.from_module,
}

# Containers replaced by a CPU version holding the same children, once those are swapped.
_CONTAINERS: dict[type, Callable[[nn.Module], nn.Module]] = {
    PlainUpsample2D: Upsample2D.from_module,
    PlainDownsample2D: Downsample2D.from_module,
    vae.Encoder: Encoder.from_module,
    vae.Decoder: Decoder.from_module,
    tiny_vae.EncoderTiny: EncoderTiny.from_module,
    tiny_vae.DecoderTiny: DecoderTiny.from_module,
}

# Modules whose SiLU reads nothing but the outputs of the named GroupNorms: each of those norms
# becomes a NormSiLU, which applies the SiLU itself, and the SiLU an identity.
_NORM_SILU: dict[type, tuple[tuple[str, ...], str]] = {
    ResnetBlock2D: (("norm1", "norm2"), "nonlinearity"),
    vae.Encoder: (("conv_norm_out",), "conv_act"),
    vae.Decoder: (("conv_norm_out",), "conv_act"),
    UNet2DConditionModel: (("conv_norm_out",), "conv_act"),
}


def _fuse_norm_silu(module: nn.Module) -> None:
    norms, activation = _NORM_SILU.get(type(module), ((), None))
    if activation is None or type(module[activation]) is not nn.SiLU:
        return
    for name in norms:
        module[name] = NormSiLU.from_module(module[name])
    module[activation] = nn.Identity()


def _swapped(module: nn.Module, loaded: bool) -> nn.Module:
    _fuse_norm_silu(module)
    swap = _SWAPS.get(type(module))
    if swap is None:
        _swap_children(module, loaded)
        container = _CONTAINERS.get(type(module))
        return module if container is None else container(module)
    replacement = swap(module)
    if loaded:
        # Evaluated one layer at a time: a re-laid-out weight exists twice only while it is copied.
        mx.eval(replacement.parameters())
    return replacement


def _swap_children(module: nn.Module, loaded: bool) -> None:
    for name in module.children():
        child = module[name]  # the stored list itself: children() hands out copies of lists
        if isinstance(child, nn.Module):
            module[name] = _swapped(child, loaded)
        elif isinstance(child, list):
            # In place, one item at a time, so that each replaced layer is freed as it goes.
            for index, item in enumerate(child):
                if isinstance(item, nn.Module):
                    child[index] = _swapped(item, loaded)


def is_accelerated(layer: nn.Module) -> bool:
    """Whether ``layer`` is one of the CPU kernels ``accelerate`` swaps in for a Linear or Conv2d
    (layers added beside it, a LoRA's, then get them too)."""
    return isinstance(layer, (Linear, Conv2d, QuantizedLinear))


def accelerate(model: nn.Module, loaded: bool = True) -> nn.Module:
    """Put the CPU kernels into ``model`` (in place) and return it. ``loaded=False``: a model
    just built, whose weights are still its lazy initial ones: only its structure changes (no
    weight is laid out or evaluated), and ``weights.load_weights`` lays each weight out as it
    loads it (and ``weights.load_weights_folder`` holds the model as below after it).
    A loaded half-precision model holds every parameter but the kernels' weights in float32
    (``widen.hold_outside_kernels``), so that it computes in float32."""
    _fuse_norm_silu(model)
    _swap_children(model, loaded)
    return hold_outside_kernels(model) if loaded else model


def prepare(model: nn.Module, cpu_kernels: bool | None = None, loaded: bool = True) -> nn.Module:
    """``model`` with the CPU kernels where ``kernels_enabled(cpu_kernels)``, else as it is."""
    return accelerate(model, loaded) if kernels_enabled(cpu_kernels) else model
