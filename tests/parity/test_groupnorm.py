"""Our NHWC GroupNorm against mlx.nn.GroupNorm(pytorch_compatible=True) and torch."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

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
