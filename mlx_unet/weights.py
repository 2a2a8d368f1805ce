"""Weights: PyTorch <-> MLX layout, and loading an MLX weights folder into a model by key.

The only layout difference between a diffusers checkpoint and ours is the convolution kernel:
PyTorch stores (out, in, kh, kw), MLX (out, kh, kw, in). Names are identical. The CPU kernels lay
their weights out in memory for their products (``weight_layouts``); shapes and values stay those
of the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import cpu
from .configs.quantization import Quantization, read_quantization
from .errors import NonFiniteWarning, WeightsError
from .quantize import prepare_structure, quantize_as_loaded, quantized_paths
from .safetensors_io import SafetensorsReader

_RECONVERT = "convert the model again with mlx-unet convert"


def torch_to_mlx_layout(array):
    """A PyTorch-layout parameter (numpy or MLX array) in MLX layout: conv kernels OIHW -> OHWI.

    A numpy result is made contiguous here, while one tensor is in hand: ``mx.array`` keeps a
    transposed view's strides, and a strided parameter is copied by every product that reads
    it until ``load_weights`` lays it out."""
    if array.ndim != 4:
        return array
    moved = array.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(moved) if isinstance(moved, np.ndarray) else moved


def torch_to_mlx_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``torch_to_mlx_layout`` gives a tensor of ``shape``."""
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else tuple(shape)


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape. Reading shapes evaluates nothing, so this is free even for SDXL."""
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def check_shapes(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]],
                 model: str = "model") -> None:
    """Raise WeightsError unless ``given`` has exactly the ``expected`` names and (MLX-layout) shapes.
    ``model`` names what the weights are for in the message ("UNet", "VAE", ...)."""
    missing = expected.keys() - given.keys()
    unexpected = given.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    misshaped = [k for k in expected.keys() & given.keys() if tuple(given[k]) != tuple(expected[k])]
    if misshaped:
        first = sorted(misshaped)[0]
        got, want = tuple(given[first]), tuple(expected[first])
        hint = ""
        if len(got) == 4 and torch_to_mlx_shape(got) == want:
            hint = "; the convolutions are in PyTorch's OIHW layout, convert the checkpoint with convert.py first"
        problems.append(
            f"{len(misshaped)} with the wrong shape ({_names(misshaped)}; {first} is {got}, expected {want}{hint})"
        )
    if problems:
        raise WeightsError(
            f"the weights do not match this {model}'s config: {'; '.join(problems)}. "
            "Check that config.json belongs to these weights."
        )


def check_weights(model: nn.Module, weights: Mapping[str, mx.array]) -> None:
    """Raise WeightsError unless ``weights`` has exactly the model's parameter names and shapes."""
    check_shapes(model_shapes(model), {k: tuple(v.shape) for k, v in weights.items()}, _model_name(model))


def _model_name(model: nn.Module) -> str:
    return {"UNet2DConditionModel": "UNet", "AutoencoderKL": "VAE", "CLIPTextModel": "text encoder"}.get(
        type(model).__name__, type(model).__name__)


def load_weights(model: nn.Module, weights: dict[str, mx.array], dtype: mx.Dtype | None = None) -> None:
    """Move ``weights`` (MLX layout, diffusers names) into ``model`` after checking every key and
    shape. ``weights`` is emptied: each tensor is taken out, evaluated and put into the model
    before the next, so that the caller's copy (a file being read, say) and the model's never
    coexist for more than one tensor."""
    check_weights(model, weights)
    layouts = weight_layouts(model)
    nonfinite = []
    for name in list(weights):
        value = weights.pop(name)
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):  # not a quantized layer's packed bits
            value = value.astype(dtype)
        # Parameters are row-major (a strided one, an mx.array of a transposed numpy view say,
        # would be copied by every product that reads it), except the weights that the CPU
        # kernels lay out for their products (cpu/linear.py, cpu/conv.py).
        value = layouts[name](value) if name in layouts else mx.contiguous(value)
        finite = mx.all(mx.isfinite(value))
        mx.eval(value, finite)  # one pass: the check costs no second read of the weights
        if not finite.item():
            nonfinite.append(name)
        model.update(tree_unflatten([(name, value)]))
    if nonfinite:
        shown = ", ".join(nonfinite[:5]) + (f", ... ({len(nonfinite) - 5} more)" if len(nonfinite) > 5 else "")
        warnings.warn(NonFiniteWarning(
            f"the {_model_name(model)}'s weights hold NaN or inf values in {len(nonfinite)} tensors ({shown}); it will "
            "make black images: convert the model again from an intact download."), stacklevel=2)


def weight_layouts(model: nn.Module) -> dict[str, Callable[[mx.array], mx.array]]:
    """Parameter name -> the function that lays that weight out in memory for its module (the
    modules that have a ``laid_out``: the CPU kernels)."""
    return {f"{path}.weight" if path else "weight": module.laid_out
            for path, module in model.named_modules() if hasattr(module, "laid_out")}


def read_weights_folder(model: nn.Module, folder: Path) -> dict[str, mx.array]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (lazily: read as evaluated),
    each file's header checked first."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(
            f"no .safetensors weights in {folder}; an MLX {_model_name(model)} folder holds config.json "
            "and the weights convert.py writes."
        )
    weights: dict[str, mx.array] = {}
    for file in files:
        # The converter's validation first (it reads the header alone): mx.load takes some malformed
        # headers (overlapping tensors, say) and fails on others without naming the file.
        SafetensorsReader(file, fix=_RECONVERT)
        try:
            part = mx.load(str(file))
        except Exception as e:  # MLX raises RuntimeError/ValueError with a terse message
            raise WeightsError(f"{file} is not a readable safetensors file ({e}); {_RECONVERT}.") from None
        duplicated = weights.keys() & part.keys()
        if duplicated:
            raise WeightsError(f"{file} repeats tensors already loaded from another file ({_names(duplicated)}).")
        weights.update(part)
    return weights


def load_weights_folder(model: nn.Module, folder: Path, dtype: mx.Dtype | None = None,
                        quantize: Quantization | None = None) -> None:
    """Load every ``*.safetensors`` file in ``folder`` into ``model``: into quantized layers where
    the folder is quantized (its config's ``mlx_unet`` section), or quantizing the policy's layers
    as they load where ``quantize`` asks (never a dense copy of the model either way)."""
    stored = read_quantization(folder, _model_name(model))
    weights = read_weights_folder(model, folder)
    if stored is not None:
        if quantize is not None and quantize != stored:
            raise WeightsError(f"{folder} is quantized already ({stored.describe()}), so it cannot be quantized to "
                               f"{quantize.describe()}; convert the dense model with those settings instead.")
        prepare_structure(model, stored, quantized_paths(weights))
    elif quantize is not None:
        weights = quantize_as_loaded(model, weights, quantize, dtype)
    load_weights(model, weights, dtype)
    if dtype is not None:
        mx.clear_cache()  # the file-dtype copies just freed would otherwise stay in MLX's cache


def load_pretrained(model: nn.Module, folder: Path, dtype: mx.Dtype | None, cpu_kernels: bool | None,
                    quantize: Quantization | None = None) -> nn.Module:
    """``model`` (just built from its config) with ``folder``'s weights, then the CPU kernels
    swapped in where ``cpu.kernels_enabled(cpu_kernels)``: config -> build -> quantize -> load ->
    kernels."""
    load_weights_folder(model, folder, dtype, quantize)
    return cpu.prepare(model, cpu_kernels)
