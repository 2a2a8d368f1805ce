"""Our Conv2d (per-tap products or gathered patches on the CPU) against torch's conv2d."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mlx_unet.cpu import conv
from mlx_unet.cpu.conv import Conv2d


def _pair(in_channels, out_channels, kernel, stride, padding, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.uniform(-1, 1, (out_channels, in_channels, kernel, kernel)).astype(np.float32)
    weight /= np.sqrt(in_channels * kernel * kernel)
    bias = rng.uniform(-0.5, 0.5, out_channels).astype(np.float32)
    ours = Conv2d(mx.array(weight.transpose(0, 2, 3, 1)), mx.array(bias), stride=stride, padding=padding)

    def reference(x):
        y = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(weight),
                                       torch.from_numpy(bias), stride=stride, padding=padding)
        return y.permute(0, 2, 3, 1).numpy()

    return ours, reference


def _relative_error(ours, reference):
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


CASES = {
    # name: (batch, height, width, in, out, kernel, stride, padding, expected path)
    "3x3 large, per-tap": (2, 40, 36, 24, 20, 3, 1, 1, "_by_taps"),
    "3x3 at the threshold": (1, 32, 32, 8, 12, 3, 1, 1, "_by_taps"),
    "3x3 just below it": (1, 31, 33, 8, 12, 3, 1, 1, "_by_patches"),
    "3x3 small": (2, 9, 7, 16, 8, 3, 1, 1, "_by_patches"),
    "1x1": (2, 12, 10, 16, 24, 1, 1, 0, "_by_taps"),
    "3x3 stride 2": (2, 17, 16, 8, 8, 3, 2, 1, "_by_patches"),
    "3x3 stride 2 unpadded": (1, 18, 18, 8, 8, 3, 2, 0, "_by_patches"),
    "5x5 per-tap": (1, 36, 40, 6, 5, 5, 1, 2, "_by_taps"),
    "3x3 unpadded per-tap": (1, 40, 36, 6, 5, 3, 1, 0, "_by_taps"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_torch_on_each_path(case, monkeypatch):
    batch, height, width, cin, cout, kernel, stride, padding, path = CASES[case]
    ours, reference = _pair(cin, cout, kernel, stride, padding)
    x = np.random.default_rng(1).normal(0.0, 1.0, (batch, height, width, cin)).astype(np.float32)
    taken = []
    for name in ("_by_taps", "_by_patches"):
        method = getattr(Conv2d, name)
        monkeypatch.setattr(Conv2d, name, lambda self, *a, _m=method, _n=name: taken.append(_n) or _m(self, *a))
    y = ours(mx.array(x))
    assert taken == [path]
    expected = reference(x)
    assert y.shape == expected.shape and y.dtype == mx.float32
    assert _relative_error(np.array(y), expected) <= 1e-5


@pytest.mark.parametrize("dtype,bound", [(mx.float16, 2e-3), (mx.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", ["3x3 large, per-tap", "3x3 small", "1x1", "3x3 stride 2"])
def test_half_precision_is_computed_in_float32_and_rounded_once(case, dtype, bound):
    batch, height, width, cin, cout, kernel, stride, padding, _ = CASES[case]
    ours, reference = _pair(cin, cout, kernel, stride, padding, seed=2)
    ours.update({k: Conv2d.laid_out(v.astype(dtype)) if k == "weight" else v.astype(dtype)
                 for k, v in ours.parameters().items()})
    x = np.random.default_rng(3).normal(0.0, 1.0, (batch, height, width, cin)).astype(np.float32)
    x_half = mx.array(x).astype(dtype)
    y = ours(x_half)
    assert y.dtype == dtype
    # The reference sees exactly the rounded weights and inputs, in float32.
    weight = np.array(ours.weight.astype(mx.float32)).transpose(0, 3, 1, 2)
    bias = np.array(ours.bias.astype(mx.float32))
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(np.array(x_half.astype(mx.float32))).permute(0, 3, 1, 2), torch.from_numpy(weight),
        torch.from_numpy(bias), stride=stride, padding=padding).permute(0, 2, 3, 1).numpy()
    assert _relative_error(np.array(y.astype(mx.float32)), expected) <= bound


@pytest.mark.cpu_only
def test_cpu_weight_layout_and_threshold():
    """The kernel keeps its (out, kh, kw, in) shape but lies in memory as (kh, kw, in, out), so
    each tap's (in, out) matrix is a row-major view; ``from_module`` lays an nn.Conv2d's out so."""
    plain = nn.Conv2d(6, 4, 3, padding=1)
    layer = Conv2d.from_module(plain)
    assert np.array_equal(np.array(layer.weight), np.array(plain.weight))
    assert layer.weight.shape == (4, 3, 3, 6)
    assert memoryview(layer.weight).strides == (4, 4 * 3 * 6 * 4, 4 * 6 * 4, 4 * 4)
    assert conv._TAPS_FROM_PIXELS == 32 * 32  # the case table above straddles it
