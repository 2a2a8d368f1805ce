"""Weights drawn as trained ones look, for measuring what quantization costs.

A uniform or Gaussian draw quantizes far better than a trained checkpoint: every group of weights
then spans the same range, so a group's scale fits all of its members. Trained weights have
structure that groupwise quantization pays for: output channels of very different sizes, tails
heavier than a Gaussian's, and a few input channels (and output channels) whose weights are many
times larger than the rest. ``trained_like`` redraws every Linear and Conv2d weight so:

    W[o, i, ...] = s * row[o] * column[i] * laplace[o, i, ...]

- ``laplace``: independent standard Laplace draws (density exp(-|x|) / 2), the shape trained
  weights are usually modelled with in quantization work: kurtosis 6 against a Gaussian's 3, so
  a group's largest weight stands further out from the rest;
- ``row[o] = exp(ROW_SIGMA * a[o])``, ``column[i] = exp(COLUMN_SIGMA * b[i])`` with standard
  normal ``a``, ``b``: log-normal per-output-channel and per-input-channel scales (ROW_SIGMA =
  0.5: the middle 68% of output channels span 2.7x; COLUMN_SIGMA = 0.25);
- outliers: ``ceil(OUTLIER_SHARE * in)`` input channels, chosen at random, have their column
  scale multiplied by OUTLIER_COLUMN (8), and ``ceil(OUTLIER_SHARE * out)`` output channels their
  row scale by OUTLIER_ROW (4); OUTLIER_SHARE = 1/256: one of 128 or 256 channels, 2 of 320, 5 of
  1280, 20 of 5120. A group of weights (groups run along the input
  channels) that holds an outlier column has its scale set by it: the rest of the group is
  quantized coarsely, more of it the larger the group;
- ``s``: the whole layer scaled to an RMS of ``1 / sqrt(fan_in)`` (fan_in = input channels x
  kernel taps), as the tests' reference draw and PyTorch's default init give: unit-variance
  outputs for unit-variance inputs, so that deep models stay finite in float16 and images are
  not saturated.

Biases, norms and embedding tables are left as the model has them. Each layer's draw is seeded by
``(seed, crc32(parameter name))``: a diffusers / transformers model and ours with the same names
get the same values (our convolutions in MLX's (out, kh, kw, in) layout), whichever is drawn.
No torch is imported unless a torch model is given (the benchmarks use this file too).
"""

from __future__ import annotations

import math
import zlib

import numpy as np

ROW_SIGMA = 0.5
COLUMN_SIGMA = 0.25
OUTLIER_SHARE = 1 / 256
OUTLIER_COLUMN = 8.0
OUTLIER_ROW = 4.0


def trained_like_weight(shape: tuple[int, ...], seed: int, name: str) -> np.ndarray:
    """One weight in PyTorch's layout: (out, in) or (out, in, kh, kw); float32."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out_ch, in_ch = shape[0], shape[1]
    row = np.exp(ROW_SIGMA * rng.standard_normal(out_ch, dtype=np.float32))
    column = np.exp(COLUMN_SIGMA * rng.standard_normal(in_ch, dtype=np.float32))
    column[rng.choice(in_ch, math.ceil(OUTLIER_SHARE * in_ch), replace=False)] *= OUTLIER_COLUMN
    row[rng.choice(out_ch, math.ceil(OUTLIER_SHARE * out_ch), replace=False)] *= OUTLIER_ROW
    # Laplace by inversion of one uniform draw: v in [0, 1), d = 2v - 1, x = sign(d) log(1 - |d|)
    # (the sign flipped: the same distribution).
    w = rng.random(shape, dtype=np.float32)
    w *= 2
    w -= 1
    sign = np.sign(w)
    np.abs(w, out=w)
    np.subtract(1, w, out=w)
    np.maximum(w, np.float32(2.0**-24), out=w)  # v = 0 exactly would give an infinite weight
    np.log(w, out=w)
    w *= sign
    del sign
    taps = (1,) * (len(shape) - 2)
    w *= row.reshape(out_ch, 1, *taps)
    w *= column.reshape(1, in_ch, *taps)
    flat = w.reshape(-1)
    mean_square = float(flat @ flat) / flat.size  # (BLAS: a float64 pass would cost more than the draw)
    w *= np.float32(1 / math.sqrt(w[0].size * mean_square))
    return w


def _torch_layers(model):
    import torch

    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            yield path, module


def _mlx_layers(model):
    import mlx.nn as nn

    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear,)):
            raise TypeError(f"{path} is quantized already: draw the dense model's weights, then quantize it")
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            yield path, module


def trained_like(model, seed: int):
    """Redraw every Linear and Conv2d weight of ``model`` (a torch module or an MLX one, dense,
    with or without the CPU kernels) as described above, in place, in the weight's dtype;
    returns ``model``. Evaluated layer by layer (MLX), so a full-size model's draw never holds
    more than one float32 layer beside the model."""
    try:
        import torch
    except ImportError:  # an MLX model, then
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        with torch.no_grad():
            for path, module in _torch_layers(model):
                w = trained_like_weight(tuple(module.weight.shape), seed, f"{path}.weight")
                module.weight.copy_(torch.from_numpy(w))
        return model

    import mlx.core as mx

    for path, module in _mlx_layers(model):
        shape = tuple(module.weight.shape)
        torch_shape = (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape
        w = trained_like_weight(torch_shape, seed, f"{path}.weight")
        if w.ndim == 4:
            w = np.ascontiguousarray(w.transpose(0, 2, 3, 1))
        value = mx.array(w).astype(module.weight.dtype)
        if hasattr(module, "laid_out"):  # the CPU kernels keep their own memory layout
            value = module.laid_out(value)
        mx.eval(value)
        module.weight = value
    return model


def describe() -> str:
    """The draw in one line, for benchmark output."""
    return (f"trained-like weights: Laplace draws, log-normal row / column scales "
            f"(sigma {ROW_SIGMA} / {COLUMN_SIGMA}), {OUTLIER_SHARE * 256:g}/256 of input channels x{OUTLIER_COLUMN:g} "
            f"and of output channels x{OUTLIER_ROW:g}, RMS 1/sqrt(fan_in)")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (infinite where they are equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


# ---------------------------------------------------------------------- quantizing a model in memory


def _parent(model, path: str):
    *parents, leaf = path.split(".")
    node = model
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, (int(leaf) if isinstance(node, list) else leaf)


def swap_modules(model, replacements: dict) -> dict:
    """Put each module of ``replacements`` (path -> module) in place; returns the ones taken out
    (path -> module), so that ``swap_modules(model, taken)`` puts them back."""
    taken = {}
    for path, module in replacements.items():
        parent, key = _parent(model, path)
        taken[path] = parent[key]
        parent[key] = module
    return taken


def quantized_linear(layer, quantization):
    """``layer`` (an ``nn.Linear``, or the CPU kernels' Linear) as the quantized layer a
    quantized model has in its place: ``nn.QuantizedLinear``, or the CPU kernels' one where
    ``layer`` is the CPU kernels' Linear (what ``cpu.prepare`` would have swapped in). Evaluated."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_unet.cpu.linear import Linear as CPULinear
    from mlx_unet.cpu.quantized import QuantizedLinear as CPUQuantizedLinear

    q = quantization
    quantized = nn.QuantizedLinear.from_linear(layer, q.group_size, q.bits, mode=q.mode)
    if isinstance(layer, CPULinear):
        quantized = CPUQuantizedLinear.from_module(quantized)
    mx.eval(quantized.parameters())
    return quantized


def quantize_in_place(model, paths, quantization) -> dict:
    """Replace the Linear layers at ``paths`` by quantized ones, one at a time (each dense layer is
    kept by the caller: no copy of the model); returns the dense layers taken out."""
    taken = {}
    for path in sorted(paths):
        parent, key = _parent(model, path)
        taken.update(swap_modules(model, {path: quantized_linear(parent[key], quantization)}))
    return taken


def conv_quantizes(conv, quantization) -> bool:
    """Whether a convolution's weight (out, kh, kw, in) splits into groups along its input channels."""
    return conv.weight.shape[-1] % quantization.group_size == 0


def fake_quantize_convs(model, paths, quantization) -> dict:
    """Round the weights of the Conv2d layers at ``paths`` through ``quantization`` (quantize, then
    dequantize: MLX has no quantized convolution, so this measures what one would cost), groups
    along the input channels of each kernel tap; returns path -> the dense weight, for
    ``restore_conv_weights``."""
    import mlx.core as mx

    q = quantization
    taken = {}
    for path in sorted(paths):
        parent, key = _parent(model, path)
        conv = parent[key]
        weight = conv.weight
        flat = weight.reshape(weight.shape[0], -1)
        packed, scales, *biases = mx.quantize(flat, q.group_size, q.bits, mode=q.mode)
        rounded = mx.dequantize(packed, scales, biases[0] if biases else None, group_size=q.group_size, bits=q.bits,
                                mode=q.mode).reshape(weight.shape).astype(weight.dtype)
        if hasattr(conv, "laid_out"):
            rounded = conv.laid_out(rounded)
        mx.eval(rounded)
        taken[path] = weight
        conv.weight = rounded
    return taken


def restore_conv_weights(model, taken: dict) -> None:
    for path, weight in taken.items():
        parent, key = _parent(model, path)
        parent[key].weight = weight
