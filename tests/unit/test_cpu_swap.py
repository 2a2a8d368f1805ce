"""``cpu.accelerate``: which modules it replaces, that parameters survive it, and how it composes
with layers it does not know (LoRA-style wrappers, grouped convolutions). MLX only, no reference."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_unet import UNet2DConditionModel, UNetConfig, cpu
from mlx_unet.cpu import activations
from mlx_unet.cpu.attention import ChunkedAttention
from mlx_unet.cpu.conv import Conv2d
from mlx_unet.cpu.linear import Linear
from mlx_unet.cpu.norm import NormSiLU
from mlx_unet.cpu.upsample import Upsample2D
from mlx_unet.models.attention import GatedGELU, ScaledDotProductAttention
from mlx_unet.models.clip import QuickGELU
from mlx_unet.models.norm import GroupNorm
from mlx_unet.models.resnet import Upsample2D as PlainUpsample2D


class LowRankWrapper(nn.Module):
    """The shape of a live LoRA layer: it holds its base layer and adds a product of its own."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        out_dims, in_dims = base.weight.shape
        self.down = mx.random.normal((rank, in_dims))
        self.up = mx.random.normal((out_dims, rank))

    def __call__(self, x):
        return self.base(x) + (x @ self.down.T) @ self.up.T


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        mx.random.seed(0)
        self.linear = nn.Linear(64, 32)
        self.layers = [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.SiLU()]
        self.gelus = [nn.GELU(), nn.GELU(approx="tanh"), QuickGELU(), GatedGELU()]
        self.attention = ScaledDotProductAttention()
        self.wrapped = LowRankWrapper(nn.Linear(64, 32))
        self.quantized = nn.QuantizedLinear(64, 32, bias=True, group_size=32, bits=8)


def _values(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_accelerate_swaps_exactly_the_known_layers_and_keeps_every_parameter():
    model = Holder()
    before = _values(model)
    assert cpu.accelerate(model) is model
    assert type(model.linear) is Linear
    assert type(model.layers[0]) is Conv2d
    assert type(model.layers[1]) is nn.Conv2d  # grouped: no CPU kernel, MLX computes it
    assert type(model.layers[2]) is activations.SiLU
    assert [type(m) for m in model.gelus] == [activations.GELU, nn.GELU, activations.QuickGELU, activations.GatedGELU]
    assert type(model.attention) is ChunkedAttention
    assert type(model.wrapped) is LowRankWrapper and type(model.wrapped.base) is Linear  # walked into
    assert type(model.quantized) is cpu.quantized.QuantizedLinear  # dequantized for BLAS, stored quantized
    after = _values(model)
    assert after.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_swapped_layers_compute_what_the_plain_ones_do():
    plain, fast = Holder(), cpu.accelerate(Holder())
    x = mx.random.normal((3, 5, 64))
    image = mx.random.normal((2, 40, 36, 8))
    q, k, v = (mx.random.normal((1, 2, 9, 16)) for _ in range(3))
    pairs = [
        (plain.linear(x), fast.linear(x)),
        (plain.wrapped(x), fast.wrapped(x)),
        (plain.quantized(x), fast.quantized(x)),
        (plain.layers[0](image), fast.layers[0](image)),
        (plain.layers[2](x), fast.layers[2](x)),
        (plain.gelus[0](x), fast.gelus[0](x)),
        (plain.gelus[2](x), fast.gelus[2](x)),
        (plain.gelus[3](x, x * 2), fast.gelus[3](x, x * 2)),
        (plain.attention(q, k, v, 0.25), fast.attention(q, k, v, 0.25)),
    ]
    for index, (want, got) in enumerate(pairs):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5, err_msg=str(index))


def test_accelerate_leaves_the_random_state_alone():
    """A seeded run draws the same noise whether or not the kernels were swapped in."""
    model = UNet2DConditionModel(UNetConfig.from_preset("tiny"))
    mx.random.seed(3)
    cpu.accelerate(model)
    after_swap = mx.random.normal((4,))
    mx.random.seed(3)
    assert mx.array_equal(after_swap, mx.random.normal((4,)))


def test_prepare_follows_the_switch(monkeypatch):
    config = UNetConfig.from_preset("tiny")
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    assert not cpu.kernels_enabled()
    assert type(cpu.prepare(UNet2DConditionModel(config)).conv_in) is nn.Conv2d
    assert type(cpu.prepare(UNet2DConditionModel(config), cpu_kernels=True).conv_in) is Conv2d
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    assert cpu.kernels_enabled() == cpu.on_cpu()
    assert type(cpu.prepare(UNet2DConditionModel(config), cpu_kernels=False).conv_in) is nn.Conv2d


@pytest.mark.cpu_only
def test_the_kernels_are_on_by_default_on_the_cpu(monkeypatch):
    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    assert cpu.kernels_enabled()
    model = cpu.prepare(UNet2DConditionModel(UNetConfig.from_preset("tiny")))
    kinds = {type(m) for _, m in model.named_modules()}
    # Every SiLU of the UNet follows a GroupNorm: each such pair is fused (cpu.norm.NormSiLU).
    assert {Linear, Conv2d, NormSiLU, activations.GatedGELU, ChunkedAttention, Upsample2D} <= kinds
    assert not kinds & {nn.Linear, nn.SiLU, ScaledDotProductAttention, GatedGELU, GroupNorm, PlainUpsample2D}
