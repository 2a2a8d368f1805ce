"""Quantized models: which layers, and how, so that a quantized model never exists dense.

Which layers: Linear layers (``nn.quantize`` replaces them by ``nn.QuantizedLinear``) whose input
width the group size divides, except the groups kept dense by measurement (``DENSE_GROUPS``;
README.md has the table: each group's share of the parameters and of the output error when it
alone is quantized). Convolutions stay dense: MLX has no quantized convolution.

How, without a dense copy:

- a quantized folder: the model is built, its layers named in the weight files as quantized
  (``<layer>.scales``) are replaced by quantized ones before anything is evaluated (their random
  initial weights are lazy and never computed), and the files load straight into them;
- a dense folder quantized as it loads (``from_pretrained(..., quantize=4)``): each weight of a
  layer to quantize is quantized as it is read (``quantize_weights``), so only one dense weight
  exists at a time;
- the converter writes quantized folders the same way, tensor by tensor.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn

from .configs.quantization import Quantization

ATTENTION, FEED_FORWARD, PROJECTIONS, EMBEDDINGS, TEXT = (
    "attention projections", "feed-forward", "proj_in/out", "time/added embeddings", "text-encoder layers")
CONVOLUTIONS = "convolutions"
# Kept dense, by measurement (benchmarks/bench_quantize.py --sensitivity).
DENSE_GROUPS: frozenset[str] = frozenset({EMBEDDINGS})


def layer_group(path: str) -> str:
    """The group a UNet or text-encoder layer belongs to, for the policy and the table."""
    if ".attn1." in path or ".attn2." in path:
        return ATTENTION
    if ".ff." in path:
        return FEED_FORWARD
    if path.endswith(("proj_in", "proj_out")):
        return PROJECTIONS
    if path.startswith(("time_embedding", "add_embedding")) or path.endswith("time_emb_proj"):
        return EMBEDDINGS
    if path.startswith("text_model") or path == "text_projection":
        return TEXT
    return CONVOLUTIONS


def quantizes(path: str, layer: nn.Module, quantization: Quantization,
              dense: Iterable[str] = DENSE_GROUPS) -> bool:
    """Whether the policy quantizes this layer: a Linear, its input width a multiple of the group
    size, its group not kept dense."""
    return (isinstance(layer, nn.Linear) and layer.weight.shape[1] % quantization.group_size == 0
            and layer_group(path) not in dense)


def _quantize_layers(model: nn.Module, quantization: Quantization, paths: set[str]) -> None:
    q = quantization
    nn.quantize(model, q.group_size, q.bits, mode=q.mode, class_predicate=lambda p, m: p in paths)


def quantizable_paths(model: nn.Module, quantization: Quantization,
                      dense: Iterable[str] = DENSE_GROUPS) -> set[str]:
    """The paths of the layers the policy quantizes in ``model``."""
    dense = frozenset(dense)
    return {path for path, layer in model.named_modules() if quantizes(path, layer, quantization, dense)}


def quantized_paths(keys: Iterable[str]) -> set[str]:
    """The layers a weight file stores quantized: those with ``scales``."""
    return {key[: -len(".scales")] for key in keys if key.endswith(".scales")}


def prepare_structure(model: nn.Module, quantization: Quantization, paths: set[str]) -> None:
    """Make the layers at ``paths`` quantized before any weight is loaded: their initial weights
    are lazy, so nothing dense is ever computed."""
    _quantize_layers(model, quantization, paths)


def quantize_weights(weights: Mapping[str, mx.array], paths: set[str], quantization: Quantization,
                     dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """``weights`` with each weight of a layer in ``paths`` replaced by its quantized form
    (weight, scales and, in affine mode, biases, next to each other), lazily: loading evaluates
    them in turn, so one dense weight exists at a time. ``dtype``: what the weight is cast to
    first (the scales and biases take it)."""
    q = quantization
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        path, _, leaf = name.rpartition(".")
        if leaf != "weight" or path not in paths:
            out[name] = value
            continue
        packed, scales, *biases = mx.quantize(value if dtype is None else value.astype(dtype), q.group_size, q.bits,
                                              mode=q.mode)
        out[name], out[f"{path}.scales"] = packed, scales
        if biases:
            out[f"{path}.biases"] = biases[0]
    return out


def quantized_bytes(parameters: Mapping[str, tuple[int, ...]], paths: set[str], quantization: Quantization,
                    dtype_size: int) -> int:
    """Bytes of a model whose dense parameter shapes are ``parameters`` with the layers at
    ``paths`` quantized (for memory estimates)."""
    total = 0
    for name, shape in parameters.items():
        count = 1
        for d in shape:
            count *= d
        quantized = name.endswith(".weight") and name[: -len(".weight")] in paths
        total += int(count * quantization.bits_per_weight(dtype_size) / 8) if quantized else count * dtype_size
    return total
