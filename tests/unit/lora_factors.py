"""Random LoRA files for the unit tests (MLX and numpy only): factors for every adaptable layer of
a model, named in a chosen layout, and the update each makes computed here in numpy from the
definitions (LoRA: up @ down * alpha / rank), independently of mlx_unet.lora's code.
(A module of its own name: ``conftest`` is ambiguous when the test tiers run together.)"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import save_file

from mlx_unet.lora.layers import adaptable_layers, torch_shape


def low_rank_factors(shape: tuple[int, ...], rank: int, rng: np.random.Generator, size: float = 0.3):
    """(down, up) in PyTorch's layout for a weight of ``shape``: a convolution's down has its kernel
    and its up is 1x1 (kohya's LoCon)."""
    down = rng.standard_normal((rank, *shape[1:])).astype(np.float32) * size / np.sqrt(np.prod(shape[1:]))
    up = rng.standard_normal((shape[0], rank, *((1, 1) if len(shape) == 4 else ()))).astype(np.float32) * size
    return down, up


def kohya_file(path: Path, model, prefix: str = "lora_unet_", rank: int = 4, alpha: float | None = 2.0,
               seed: int = 0, only=None) -> dict[str, np.ndarray]:
    """A kohya LoRA for every adaptable layer of ``model`` (or those whose path ``only`` accepts),
    named ``prefix + path with dots as underscores``; returns the file's tensors."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer_path, layer in adaptable_layers(model):
        if only is not None and not only(layer_path):
            continue
        name = prefix + layer_path.replace(".", "_")
        down, up = low_rank_factors(torch_shape(layer), rank, rng)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(tensors, str(path))
    return tensors


def reference_weights(model, tensors: dict[str, np.ndarray], scale: float, prefix: str = "lora_unet_") -> dict:
    """Every updated layer's weight, in MLX's layout, as numpy float64: W + scale * alpha/rank *
    up @ down, from the file's tensors."""
    weights = {}
    for layer_path, layer in adaptable_layers(model):
        name = prefix + layer_path.replace(".", "_")
        if f"{name}.lora_down.weight" not in tensors:
            continue
        down, up = tensors[f"{name}.lora_down.weight"].astype(np.float64), tensors[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
        shape = torch_shape(layer)
        delta = (up.reshape(shape[0], rank).astype(np.float64) @ down.reshape(rank, -1)).reshape(shape)
        delta *= scale * alpha / rank
        if delta.ndim == 4:
            delta = delta.transpose(0, 2, 3, 1)
        weights[layer_path] = np.array(layer.weight.astype(mx.float32)).astype(np.float64) + delta
    return weights


def parameters(model) -> dict[str, np.ndarray]:
    """Every parameter's bytes (as a contiguous numpy copy): bit-for-bit comparisons."""
    from mlx.utils import tree_flatten

    out = {}
    for name, value in tree_flatten(model.parameters()):
        array = np.ascontiguousarray(np.array(value.view(mx.uint16) if value.dtype == mx.bfloat16 else value))
        out[name] = array.view(np.uint8)
    return out


def same_bits(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> bool:
    return before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
