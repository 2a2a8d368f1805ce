"""Quantized models: which layers, and how, so that a quantized model never exists dense.

Which layers: Linear layers (``nn.quantize`` replaces them by ``nn.QuantizedLinear``) whose input
width the group size divides, except the groups kept dense by measurement (``dense_groups``;
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
# Kept dense at 8 bits, by measurement (benchmarks/bench_quantize.py sensitivity; the table is in
# README.md): proj_in/out and the time/added embeddings give a quarter of the 8-bit UNet's error
# from 2% of its parameters, and dense they cost 1.5% more memory. At 4 bits they are quantized
# too: dense, they would take SDXL's UNet from 1.79 to 1.86 GiB, past the 1.8 GiB an 8 GB Mac can
# spare for it (their share of the 4-bit error is in the same table).
DENSE_AT_8_BITS: frozenset[str] = frozenset({PROJECTIONS, EMBEDDINGS})


def dense_groups(quantization: Quantization) -> frozenset[str]:
    """The layer groups the policy keeps dense at this quantization."""
    return DENSE_AT_8_BITS if quantization.bits == 8 else frozenset()


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


def quantizes(path: str, layer: nn.Module, quantization: Quantization, dense: Iterable[str] | None = None) -> bool:
    """Whether the policy quantizes this layer: a Linear, its input width a multiple of the group
    size, its group not kept dense (``dense``: those groups instead of ``dense_groups``)."""
    dense = dense_groups(quantization) if dense is None else dense
    return (isinstance(layer, nn.Linear) and layer.weight.shape[1] % quantization.group_size == 0
            and layer_group(path) not in dense)


def quantizable_paths(model: nn.Module, quantization: Quantization, dense: Iterable[str] | None = None) -> set[str]:
    """The paths of the layers the policy quantizes in ``model`` (``dense``: as ``quantizes``)."""
    dense = dense_groups(quantization) if dense is None else frozenset(dense)
    return {path for path, layer in model.named_modules() if quantizes(path, layer, quantization, dense)}


def quantized_paths(keys: Iterable[str]) -> set[str]:
    """The layers a weight file stores quantized: those with ``scales``."""
    return {key[: -len(".scales")] for key in keys if key.endswith(".scales")}


def prepare_structure(model: nn.Module, quantization: Quantization, paths: set[str]) -> None:
    """Make the layers at ``paths`` quantized before any weight is loaded: their initial weights
    are lazy, so nothing dense is ever computed."""
    q = quantization
    nn.quantize(model, q.group_size, q.bits, mode=q.mode, class_predicate=lambda path, _: path in paths)


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


def quantize_as_loaded(model: nn.Module, weights: Mapping[str, mx.array], quantization: Quantization,
                       dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """Make the policy's layers of ``model`` quantized, and return ``weights`` (dense, as read)
    with theirs quantized lazily (``quantize_weights``): what loading a dense folder with
    ``quantize=`` does."""
    paths = quantizable_paths(model, quantization)
    prepare_structure(model, quantization, paths)
    return quantize_weights(weights, paths, quantization, dtype)
