"""The numerical reference: diffusers' UNet2DConditionModel built in this process.

Weights are seeded and drawn so that every parameter matters: PyTorch's default init leaves norm
scales at exactly 1 and shifts at 0, so a swapped or ignored norm parameter would go unnoticed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import mlx.core as mx
import numpy as np
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from mlx_unet import UNet2DConditionModel, UNetConfig, cpu
from mlx_unet.weights import load_weights, torch_to_mlx_layout


def init_every_parameter(model: torch.nn.Module, seed: int) -> None:
    """Uniform draws (numpy's generator fills 2.6 B floats in seconds), scaled per kind of tensor.

    Values are drawn in float32 whatever the parameter dtype, so a float16 model holds exactly the
    float16 rounding of the float32 model with the same seed.
    """
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        values = np.empty(p.shape, dtype=np.float32)
        rng.random(out=values, dtype=np.float32)
        if p.ndim >= 2:  # linear and conv weights: unit-variance outputs for unit-variance inputs
            half_width, centre = (3.0 / p[0].numel()) ** 0.5, 0.0
        elif name.endswith("weight"):  # norm scales around 1
            half_width, centre = 0.35, 1.0
        else:  # biases and norm shifts
            half_width, centre = 0.35, 0.0
        values *= 2 * half_width
        values += centre - half_width
        with torch.no_grad():
            p.copy_(torch.from_numpy(values))


def torch_unet(config: UNetConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> TorchUNet:
    """diffusers' UNet with every parameter drawn from ``seed``; allocated once, in ``dtype``."""
    with torch.device("meta"):
        model = TorchUNet(**config.to_diffusers_dict())
    model = model.to_empty(device="cpu")
    if dtype != torch.float32:  # (diffusers warns about any .to(dtype) cast)
        model = model.to(dtype)
    init_every_parameter(model, seed)
    return model.eval()


def mlx_weights(state: dict[str, torch.Tensor], dtype=mx.float32, consume: bool = False) -> dict[str, mx.array]:
    """A diffusers state dict in MLX layout. ``consume`` empties ``state`` as it goes, so that for
    the full-size model the torch and MLX copies never coexist (they would not fit in memory)."""
    weights = {}
    for name in list(state):
        tensor = state.pop(name) if consume else state[name]
        weights[name] = mx.array(torch_to_mlx_layout(tensor.detach().numpy())).astype(dtype)
        mx.eval(weights[name])
        del tensor
    return weights


def mlx_from_torch(model: TorchUNet, config: UNetConfig, dtype=mx.float32) -> UNet2DConditionModel:
    """Our UNet with ``model``'s weights (copied)."""
    ours = UNet2DConditionModel(config)
    load_weights(ours, mlx_weights(model.state_dict(), dtype))
    return cpu.prepare(ours)  # the code path the test runs on: see conftest's code_path


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def release_memory() -> None:
    """Return freed memory to the OS between the phases of a full-size test: Python's garbage,
    MLX's buffer cache, and glibc's heap (torch frees its many mid-size tensors there, and glibc
    keeps them; without the trim the next 10 GB model lands on top of them)."""
    gc.collect()
    mx.clear_cache()
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _timesteps(value) -> np.ndarray:
    """Keep ints as ints (both models must accept them), floats as float32."""
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype.kind == "f" else array


def make_inputs(config: UNetConfig, batch: int, height: int, width: int, seed: int = 0, tokens: int = 7,
                timesteps=None, n_time_ids: int | None = None) -> dict[str, np.ndarray]:
    """Seeded NCHW-free inputs in numpy (NHWC sample), valid for ``config``."""
    rng = np.random.default_rng(seed)
    inputs = {
        "sample": rng.standard_normal((batch, height, width, config.in_channels), dtype=np.float32),
        "timestep": _timesteps(999.0 if timesteps is None else timesteps),
        "encoder_hidden_states": rng.standard_normal((batch, tokens, config.cross_attention_dim), dtype=np.float32),
    }
    if config.has_text_time_embedding:
        n = n_time_ids or 6
        pooled = config.projection_class_embeddings_input_dim - n * config.addition_time_embed_dim
        inputs["text_embeds"] = rng.standard_normal((batch, pooled), dtype=np.float32)
        # Sizes and crop offsets as SDXL pipelines pass them (the refiner's last id is a score).
        inputs["time_ids"] = rng.integers(0, 1024, (batch, n)).astype(np.float32)
    return inputs


@torch.no_grad()
def run_torch(model: TorchUNet, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """diffusers' forward on the same inputs (cast to the model's dtype; the timesteps as they
    are, diffusers casts them itself); returned NHWC float32."""
    t = inputs["timestep"]

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(inputs[name]).to(model.dtype)

    kwargs = {}
    if "text_embeds" in inputs:
        kwargs["added_cond_kwargs"] = {"text_embeds": tensor("text_embeds"), "time_ids": tensor("time_ids")}
    out = model(
        tensor("sample").permute(0, 3, 1, 2),
        torch.from_numpy(t) if t.ndim else t.item(),
        tensor("encoder_hidden_states"),
        **kwargs,
    ).sample
    return out.float().permute(0, 2, 3, 1).numpy()  # .float(): numpy has no bfloat16


def run_mlx(model: UNet2DConditionModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    t = inputs["timestep"]
    out = model(
        mx.array(inputs["sample"]),
        mx.array(t) if t.ndim else t.item(),
        mx.array(inputs["encoder_hidden_states"]),
        text_embeds=mx.array(inputs["text_embeds"]) if "text_embeds" in inputs else None,
        time_ids=mx.array(inputs["time_ids"]) if "time_ids" in inputs else None,
    )
    return np.array(out.astype(mx.float32))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """The worst batch item's max |ours - reference| / max |reference| (axis 0 is the batch of
    arrays of 2 or more axes): taken over the whole batch, a wrong item with small values would
    hide behind a right one with large values."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    items = len(reference) if reference.ndim >= 2 else 1
    error = np.abs(ours - reference).reshape(items, -1).max(axis=1)
    return float((error / np.abs(reference).reshape(items, -1).max(axis=1)).max())


# Every family at a width that runs in well under a second, keeping what makes each family
# different: level count, block types, head counts vs head widths, projection kind, time ids.
_TINY_SDXL = {"norm_num_groups": 8, "addition_time_embed_dim": 8}
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "sdxl-base": ("tiny", {}),
    "sdxl-refiner": ("sdxl-refiner", {
        **_TINY_SDXL, "block_out_channels": [32, 64, 96, 96], "attention_head_dim": [2, 4, 6, 6],
        "transformer_layers_per_block": 2, "cross_attention_dim": 40,
        "projection_class_embeddings_input_dim": 32 + 5 * 8,
    }),
    "sd15": ("sd15", {"block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8, "cross_attention_dim": 24}),
    "sd2": ("sd2", {
        "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8, "attention_head_dim": [2, 4, 4, 4],
        "cross_attention_dim": 40,
    }),
    "sd15-inpaint": ("sd15-inpaint", {"block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8, "cross_attention_dim": 24}),
    "sdxl-inpaint": ("tiny", {"in_channels": 9}),
}

# Number of SDXL micro-conditioning ids per family (the refiner drops target_size, adds a score).
TIME_IDS = {"sdxl-refiner": 5}


def tiny_config(family: str, **overrides) -> UNetConfig:
    preset, changes = TINY_FAMILIES[family]
    return UNetConfig.from_preset(preset, **{**changes, **overrides})
