"""Our Conv2d (per-tap products or gathered patches on the CPU) and the fused upsampler (nearest 2x
and a 3x3 convolution) against torch."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlx_unet.cpu import conv, winograd
from mlx_unet.cpu.conv import Conv2d
from mlx_unet.cpu.downsample import Downsample2D
from mlx_unet.cpu.upsample import Upsample2D
from mlx_unet.models.resnet import Downsample2D as PlainDownsample2D
from mlx_unet.models.resnet import Upsample2D as PlainUpsample2D


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
    # name: (batch, height, width, in, out, kernel, stride, padding, expected path; None: one product)
    "3x3 large, per-tap": (2, 40, 36, 24, 20, 3, 1, 1, "_by_taps"),
    "3x3 at the threshold": (1, 32, 32, 8, 12, 3, 1, 1, "_by_taps"),
    "3x3 just below it": (1, 31, 33, 8, 12, 3, 1, 1, "_by_patches"),
    "3x3 small": (2, 9, 7, 16, 8, 3, 1, 1, "_by_patches"),
    "1x1": (2, 12, 10, 16, 24, 1, 1, 0, None),
    "3x3 stride 2": (2, 17, 16, 8, 8, 3, 2, 1, "_by_patches"),
    "3x3 stride 2 unpadded": (1, 18, 18, 8, 8, 3, 2, 0, "_by_patches"),
    "3x3 stride 2 per-tap": (2, 67, 64, 8, 12, 3, 2, 1, "_by_taps"),
    "3x3 stride 2 unpadded per-tap": (1, 65, 66, 8, 9, 3, 2, 0, "_by_taps"),
    "4x4 stride 3 per-tap": (1, 100, 98, 6, 6, 4, 3, 1, "_by_taps"),
    "5x5 per-tap": (1, 36, 40, 6, 5, 5, 1, 2, "_by_taps"),
    "3x3 unpadded per-tap": (1, 40, 36, 8, 12, 3, 1, 0, "_by_taps"),
    "3x3 to an image's 3 channels": (2, 40, 36, 16, 3, 3, 1, 1, "_by_outputs"),
    "3x3 stride 2 to 4 channels": (1, 67, 64, 16, 4, 3, 2, 1, "_by_outputs"),
    "3x3 from an image's 3 channels": (1, 40, 36, 3, 16, 3, 1, 1, "_by_patches"),
    "3x3 Winograd": (2, 32, 32, 128, 136, 3, 1, 1, "winograd"),
    "3x3 Winograd, partial tiles": (1, 50, 46, 128, 128, 3, 1, 1, "winograd"),
    "3x3 Winograd unpadded": (1, 54, 50, 136, 128, 3, 1, 0, "winograd"),
    "3x3 too few tiles for Winograd": (1, 36, 32, 128, 128, 3, 1, 1, "_by_taps"),
    "3x3 too few channels for Winograd": (2, 32, 32, 120, 128, 3, 1, 1, "_by_taps"),
    "3x3 stride 2, many channels": (2, 66, 64, 128, 128, 3, 2, 1, "_by_taps"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_torch_on_each_path(case, monkeypatch):
    batch, height, width, cin, cout, kernel, stride, padding, path = CASES[case]
    ours, reference = _pair(cin, cout, kernel, stride, padding)
    x = np.random.default_rng(1).normal(0.0, 1.0, (batch, height, width, cin)).astype(np.float32)
    taken = []
    for name in ("_by_taps", "_by_patches", "_by_outputs"):
        method = getattr(Conv2d, name)
        monkeypatch.setattr(Conv2d, name, lambda self, *a, _m=method, _n=name: taken.append(_n) or _m(self, *a))
    convolve = winograd.convolve
    monkeypatch.setattr(winograd, "convolve", lambda *a: taken.append("winograd") or convolve(*a))
    y = ours(mx.array(x))
    assert taken == ([] if path is None else [path])
    expected = reference(x)
    assert y.shape == expected.shape and y.dtype == mx.float32
    assert _relative_error(np.array(y), expected) <= 1e-5


@pytest.mark.parametrize("case", ["3x3 large, per-tap", "3x3 stride 2 per-tap", "5x5 per-tap"])
def test_per_tap_products_in_blocks_of_rows_join_up(case, monkeypatch):
    """Blocks of 3-4 output rows (the last one shorter): each block's products see only its rows."""
    batch, height, width, cin, cout, kernel, stride, padding, _ = CASES[case]
    ours, reference = _pair(cin, cout, kernel, stride, padding, seed=4)
    monkeypatch.setattr(conv, "_BLOCK_PIXELS", 4 * (width // stride + kernel))
    x = np.random.default_rng(5).normal(0.0, 1.0, (batch, height, width, cin)).astype(np.float32)
    assert _relative_error(np.array(ours(mx.array(x))), reference(x)) <= 1e-5


def test_winograd_bands_of_tile_rows_join_up(monkeypatch):
    """Bands of 3 tile rows (the last one of 1, its tiles partly past the output): each band's
    tiles see only its rows."""
    batch, height, width, cin, cout, kernel, stride, padding, _ = CASES["3x3 Winograd, partial tiles"]
    ours, reference = _pair(cin, cout, kernel, stride, padding, seed=12)
    monkeypatch.setattr(winograd, "_BAND_VALUES", 3 * 12 * 128)  # 3 rows of 12 tiles of 128 channels
    x = np.random.default_rng(13).normal(0.0, 1.0, (batch, height, width, cin)).astype(np.float32)
    assert _relative_error(np.array(ours(mx.array(x))), reference(x)) <= 1e-5


def test_winograd_holds_back_a_large_kernel_transform(monkeypatch):
    """Over ``MAX_KERNEL_VALUES`` (36 per channel pair) the per-tap products run instead."""
    batch, height, width, cin, cout, *_ = CASES["3x3 Winograd"]
    assert winograd.applies(batch, height, width, cin, cout)
    monkeypatch.setattr(winograd, "MAX_KERNEL_VALUES", 36 * cin * cout - 1)
    assert not winograd.applies(batch, height, width, cin, cout)


def test_winograd_matrices_compute_a_convolution_exactly():
    """The transforms, in exact fractions, give a 1D correlation of a 6-tap signal with a 3-tap
    kernel (4 outputs) for every unit input: any error in ``_toom_cook`` shows as a nonzero."""
    input_t, kernel_t, output_t = winograd._toom_cook(winograd._POINTS)
    for k in range(6):
        for j in range(3):
            signal = np.array([int(i == k) for i in range(6)], dtype=object)
            taps = np.array([int(i == j) for i in range(3)], dtype=object)
            result = output_t.dot(kernel_t.dot(taps) * input_t.dot(signal))
            assert list(result) == [int(k - i == j) for i in range(4)]


@pytest.mark.parametrize("dtype,bound", [(mx.float16, 2e-3), (mx.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", ["3x3 large, per-tap", "3x3 small", "1x1", "3x3 stride 2", "3x3 stride 2 per-tap",
                                  "3x3 to an image's 3 channels", "3x3 Winograd"])
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


BOTTOM_RIGHT_CASES = {
    # name: (batch, height, width, in, out, padding, expected path), 3x3 kernels of stride 2
    "even sides, per-tap": (1, 64, 66, 8, 9, 0, "_by_taps"),
    "odd sides, per-tap": (2, 65, 67, 8, 9, 0, "_by_taps"),
    "padded too, per-tap": (1, 66, 64, 8, 12, 1, "_by_taps"),
    "to 4 channels": (1, 64, 64, 16, 4, 0, "_by_outputs"),
    "small": (1, 18, 17, 8, 8, 0, "_by_patches"),
}


@pytest.mark.parametrize("case", list(BOTTOM_RIGHT_CASES))
def test_bottom_right_padding_matches_torch_on_each_path(case, monkeypatch):
    """``pad_bottom_right``: one zero row and column below and right of the image before the
    convolution, as diffusers' downsampler pads (made in the rows' copy on the per-tap paths)."""
    batch, height, width, cin, cout, padding, path = BOTTOM_RIGHT_CASES[case]
    ours, reference = _pair(cin, cout, 3, 2, padding, seed=13)
    x = np.random.default_rng(14).normal(0.0, 1.0, (batch, height, width, cin)).astype(np.float32)
    taken = []
    for name in ("_by_taps", "_by_patches", "_by_outputs"):
        method = getattr(Conv2d, name)
        monkeypatch.setattr(Conv2d, name, lambda self, *a, _m=method, _n=name: taken.append(_n) or _m(self, *a))
    y = np.array(ours(mx.array(x), pad_bottom_right=1))
    assert taken == [path]
    expected = reference(np.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))
    assert y.shape == expected.shape
    assert _relative_error(y, expected) <= 1e-5


@pytest.mark.parametrize("padding,size", [(0, 64), (0, 65), (1, 64)])
def test_downsampler_matches_the_plain_one(padding, size):
    """The CPU's Downsample2D (its padding made by the convolution) against the model file's
    (an explicit pad, then MLX's convolution), the VAE's unpadded kind and the UNet's padded one."""
    plain = PlainDownsample2D(8, padding=padding)
    rng = np.random.default_rng(15)
    plain.conv.weight = mx.array(rng.uniform(-1, 1, (8, 3, 3, 8)).astype(np.float32) / np.sqrt(72))
    plain.conv.bias = mx.array(rng.uniform(-0.5, 0.5, 8).astype(np.float32))
    fused = Downsample2D.from_module(PlainDownsample2D(8, padding=padding))
    fused.conv = Conv2d.from_module(plain.conv)
    assert fused.pad_bottom_right == (padding == 0)
    x = mx.array(rng.normal(0.0, 1.0, (1, size, size, 8)).astype(np.float32))
    expected = np.array(plain(x))
    assert expected.shape == (1, size // 2, size // 2, 8)
    assert _relative_error(np.array(fused(x)), expected) <= 1e-5


@pytest.mark.cpu_only
def test_cpu_weight_layout_and_threshold():
    """The kernel keeps its (out, kh, kw, in) shape but lies in memory as (kh, kw, in, out), so
    each tap's (in, out) matrix is a row-major view; ``from_module`` lays an nn.Conv2d's out so."""
    plain = nn.Conv2d(6, 4, 3, padding=1)
    layer = Conv2d.from_module(plain)
    assert np.array_equal(np.array(layer.weight), np.array(plain.weight))
    assert layer.weight.shape == (4, 3, 3, 6)
    assert memoryview(layer.weight).strides == (4, 4 * 3 * 6 * 4, 4 * 6 * 4, 4 * 4)
    # The case table above straddles each of these.
    assert conv._TAPS_FROM_PIXELS == 32 * 32 and conv._FEW == 64
    assert winograd.MIN_TILES == 128 and winograd.MIN_CHANNELS == 128


# ---------------------------------------------------------------------- the fused upsampler


def _upsampler(channels, seed):
    plain = PlainUpsample2D(channels)
    rng = np.random.default_rng(seed)
    weight = rng.uniform(-1, 1, (channels, 3, 3, channels)).astype(np.float32) / np.sqrt(9 * channels)
    plain.conv.weight = mx.array(weight)
    plain.conv.bias = mx.array(rng.uniform(-0.5, 0.5, channels).astype(np.float32))
    fused = Upsample2D.from_module(PlainUpsample2D(channels))
    fused.conv = Conv2d.from_module(plain.conv)
    return plain, fused


def _torch_upsample_conv(x, plain, size=None):
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=size, scale_factor=None if size else 2.0, mode="nearest")
    weight = torch.from_numpy(np.array(plain.conv.weight)).permute(0, 3, 1, 2)
    return F.conv2d(t, weight, torch.from_numpy(np.array(plain.conv.bias)), padding=1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("shape,block_rows", [((2, 9, 7), None), ((1, 20, 26), 3), ((1, 1, 1), None)])
def test_fused_upsampler_matches_torch(shape, block_rows, monkeypatch):
    """Nearest 2x then a 3x3 convolution, as four 2x2 convolutions of the source: against torch's
    interpolate + conv2d, in blocks of source rows too (the last one shorter)."""
    plain, fused = _upsampler(6, seed=6)
    if block_rows:
        monkeypatch.setattr(conv, "_BLOCK_PIXELS", block_rows * (shape[2] + 2))
    x = np.random.default_rng(7).normal(0.0, 1.0, (*shape, 6)).astype(np.float32)
    taken = []
    monkeypatch.setattr(PlainUpsample2D, "__call__", lambda *a: taken.append(1) or None)  # the fallback
    out = np.array(fused(mx.array(x)))
    assert not taken and out.shape == (shape[0], 2 * shape[1], 2 * shape[2], 6)
    assert _relative_error(out, _torch_upsample_conv(x, plain)) <= 1e-5


@pytest.mark.parametrize("dtype,bound", [(mx.float16, 2e-3), (mx.bfloat16, 1e-2)])
def test_fused_upsampler_in_half_precision(dtype, bound):
    plain, fused = _upsampler(8, seed=8)
    fused.conv.update({k: Conv2d.laid_out(v.astype(dtype)) if k == "weight" else v.astype(dtype)
                       for k, v in fused.conv.parameters().items()})
    plain.conv.update({k: v.astype(dtype) for k, v in plain.conv.parameters().items()})
    x = mx.array(np.random.default_rng(9).normal(0.0, 1.0, (1, 12, 10, 8)).astype(np.float32)).astype(dtype)
    out = fused(x)
    assert out.dtype == dtype
    plain32 = PlainUpsample2D(8)
    plain32.conv.weight, plain32.conv.bias = plain.conv.weight.astype(mx.float32), plain.conv.bias.astype(mx.float32)
    expected = _torch_upsample_conv(np.array(x.astype(mx.float32)), plain32)
    assert _relative_error(np.array(out.astype(mx.float32)), expected) <= bound


def test_upsampler_to_another_size_is_left_to_the_plain_code():
    """An explicit size other than 2x (the UNet's odd skip sizes) takes the plain path."""
    plain, fused = _upsampler(4, seed=10)
    x = np.random.default_rng(11).normal(0.0, 1.0, (1, 5, 6, 4)).astype(np.float32)
    out = np.array(fused(mx.array(x), size=(9, 11)))
    assert _relative_error(out, _torch_upsample_conv(x, plain, size=(9, 11))) <= 1e-5
