"""Our NHWC GroupNorm (plain, and the CPU's compiled one and its fusion with SiLU) against
mlx.nn.GroupNorm(pytorch_compatible=True) and torch."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mlx_unet.cpu import norm as cpu_norm
from mlx_unet.cpu.norm import GroupNorm as CpuGroupNorm
from mlx_unet.cpu.norm import NormSiLU
from mlx_unet.models.norm import GroupNorm


def _pair(groups, channels, eps, seed=0):
    rng = np.random.default_rng(seed)
    ours = GroupNorm(groups, channels, eps)
    ours.weight = mx.array(rng.normal(1.0, 0.3, channels).astype(np.float32))
    ours.bias = mx.array(rng.normal(0.0, 0.3, channels).astype(np.float32))
    theirs = nn.GroupNorm(groups, channels, eps=eps, pytorch_compatible=True)
    theirs.weight, theirs.bias = ours.weight, ours.bias
    return ours, theirs


@pytest.mark.parametrize("groups,channels,shape", [(32, 320, (2, 9, 7)), (8, 64, (1, 16, 16)), (1, 6, (3, 5, 4))])
def test_equals_mlx_pytorch_compatible_groupnorm(groups, channels, shape):
    ours, theirs = _pair(groups, channels, 1e-5)
    x = mx.array(np.random.default_rng(1).normal(3.0, 2.0, (*shape, channels)).astype(np.float32))
    np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), rtol=1e-5, atol=1e-5)


def test_equals_torch_group_norm():
    ours, _ = _pair(32, 128, 1e-6)
    x = np.random.default_rng(2).normal(0.5, 4.0, (2, 12, 10, 128)).astype(np.float32)
    ref = torch.nn.functional.group_norm(
        torch.from_numpy(x).permute(0, 3, 1, 2), 32,
        torch.from_numpy(np.array(ours.weight)), torch.from_numpy(np.array(ours.bias)), 1e-6,
    ).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.array(ours(mx.array(x))), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(mx.float16, 2e-2), (mx.bfloat16, 8e-2)])
def test_half_precision_keeps_float32_statistics(dtype, atol):
    """A large mean with a small spread: statistics taken in half precision would be off by ~0.1."""
    ours, _ = _pair(4, 16, 1e-5)
    x = mx.array(np.random.default_rng(3).normal(200.0, 0.5, (1, 64, 64, 16)).astype(np.float32)).astype(dtype)
    out = ours(x)
    assert out.dtype == dtype
    xs = np.array(x.astype(mx.float32)).astype(np.float64).reshape(1, -1, 4, 4)
    normed = (xs - xs.mean(axis=(1, 3), keepdims=True)) / np.sqrt(xs.var(axis=(1, 3), keepdims=True) + 1e-5)
    ref = normed.reshape(x.shape) * np.array(ours.weight) + np.array(ours.bias)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), ref, atol=atol)


# ---------------------------------------------------------------------- the CPU's compiled versions


def _torch_norm(x, ours, silu):
    t = torch.nn.functional.group_norm(
        torch.from_numpy(x).permute(0, 3, 1, 2).double(), ours.num_groups,
        torch.from_numpy(np.array(ours.weight)).double(), torch.from_numpy(np.array(ours.bias)).double(), ours.eps)
    return (torch.nn.functional.silu(t) if silu else t).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kind,bands", [(CpuGroupNorm, False), (NormSiLU, False), (NormSiLU, True)],
                         ids=["groupnorm", "norm-silu", "norm-silu-in-bands"])
@pytest.mark.parametrize("groups,channels,shape", [(32, 128, (2, 12, 10)), (4, 16, (1, 41, 3))])
def test_cpu_kernels_match_torch(kind, bands, groups, channels, shape, monkeypatch):
    """Against float64; the shift of 3 and a spread of 4 reach far into SiLU's tails. In bands:
    of 4 rows (the last one shorter) on two streams in turn, as large activations are computed."""
    monkeypatch.setattr(cpu_norm, "_BAND", 4 * shape[2] * channels if bands else 1 << 40)
    plain, _ = _pair(groups, channels, 1e-6, seed=4)
    ours = kind.from_module(plain)
    x = np.random.default_rng(5).normal(3.0, 4.0, (*shape, channels)).astype(np.float32)
    out = np.array(ours(mx.array(x)))
    assert np.abs(out - _torch_norm(x, ours, kind is NormSiLU)).max() <= 2e-6 * max(np.abs(out).max(), 1)


@pytest.mark.parametrize("bands", [False, True], ids=["whole", "in-bands"])
@pytest.mark.parametrize("dtype,ulp", [(mx.float16, 2.0**-10), (mx.bfloat16, 2.0**-7)])
def test_norm_silu_rounds_the_float32_result_once(dtype, ulp, bands, monkeypatch):
    """Within one unit in the last place of the exact result: computed in float32, rounded once."""
    monkeypatch.setattr(cpu_norm, "_BAND", 5 * 12 * 32 if bands else 1 << 40)
    plain, _ = _pair(8, 32, 1e-5, seed=6)
    ours = NormSiLU.from_module(plain)
    x = mx.array(np.random.default_rng(7).normal(1.0, 2.0, (1, 16, 12, 32)).astype(np.float32)).astype(dtype)
    out = ours(x)
    assert out.dtype == dtype
    expected = _torch_norm(np.array(x.astype(mx.float32)), ours, silu=True)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), expected, rtol=ulp, atol=1e-6)


def test_norm_silu_of_extreme_values_is_finite():
    """Normalised values far outside SiLU's range: the clip keeps 2**n a normal float."""
    plain, _ = _pair(1, 4, 1e-6, seed=8)
    plain.weight = mx.array([1e4, -1e4, 1.0, 1.0], dtype=mx.float32)
    ours = NormSiLU.from_module(plain)
    x = np.random.default_rng(9).normal(0.0, 1.0, (1, 6, 5, 4)).astype(np.float32)
    out = np.array(ours(mx.array(x)))
    assert np.isfinite(out).all()
    assert np.abs(out - _torch_norm(x, ours, silu=True)).max() <= 2e-6 * np.abs(out).max()
