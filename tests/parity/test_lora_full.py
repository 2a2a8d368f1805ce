"""A rank-32 LoRA on every attention projection of SDXL base at its full size (2.57 B parameters,
float32), fused and removed: the fused weights are the definition computed in numpy float64,
and removing gives every parameter back bit for bit.

The weights are drawn in numpy (uniform, +-1/sqrt(fan-in), as PyTorch's default init), each made
directly in the memory layout our CPU kernels keep it in (no re-layout copy at load); the LoRA is
a kohya file written here from numpy factors (alpha 16 != rank 32, scale 0.8). Memory: the
model's 10.3 GB, a copy of the touched weights' bits (3.8 GB, made before the fuse: MLX's peak
during the fuse is the fuse's own) and the LoRA.
"""

from __future__ import annotations

import re
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from safetensors.numpy import save_file

from mlx_unet import UNet2DConditionModel, UNetConfig, cpu
from mlx_unet.cpu.conv import Conv2d as CPUConv2d
from mlx_unet.lora import apply_lora, read_lora
from mlx_unet.lora.layers import adaptable_layers, base_of, layer_at, torch_shape

ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
RANK, ALPHA, SCALE = 32, 16.0, 0.8
# The goals on this machine, and the sanity bounds asserted here (4x: shared, noisy hosts).
GOAL_SECONDS, GOAL_PEAK_GIB = 5.0, 0.5


def random_unet(config: UNetConfig, seed: int) -> UNet2DConditionModel:
    """The UNet with the CPU kernels and numpy-drawn float32 weights, each allocated once in the
    memory order the CPU kernels keep it in (a convolution's ``memory_order``; row-major otherwise),
    put in before the kernels are (the swap evaluates the weights it lays out, which are then laid
    out already)."""
    model = UNet2DConditionModel(config)  # (its initialisation is never evaluated)
    orders = {}  # (a wrong guess here would only cost the swap a copy)
    for path, layer in adaptable_layers(model):
        if type(layer) is nn.Conv2d and CPUConv2d.supports(layer):
            orders[f"{path}.weight"] = CPUConv2d.memory_order
    rng = np.random.default_rng(seed)
    shapes = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    buffer = np.empty(max(int(np.prod(shape)) for shape in shapes.values()), dtype=np.float32)  # one, reused
    weights = []
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        order = orders.get(name, tuple(range(len(shape))))
        drawn = buffer[:int(np.prod(shape))].reshape([shape[i] for i in order])
        rng.random(out=drawn, dtype=np.float32)
        bound = np.float32(1 / np.sqrt(fan_in))
        drawn *= 2 * bound
        drawn -= bound
        weights.append((name, mx.array(drawn).transpose(np.argsort(order).tolist())))
        mx.eval(weights[-1][1])
    model.update(tree_unflatten(weights))
    del weights
    return cpu.prepare(model)


def write_lora(path, model, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A kohya LoRA (lora_unet_ + our path with dots as underscores) on every attention
    projection: (down, up) per layer path, down ~ N(0, 1/in), up sized for an update of about 2%
    of the weights' size (a few percent of elements are then recorded by the fuse)."""
    rng = np.random.default_rng(seed)
    factors, tensors = {}, {}
    for layer_path, layer in adaptable_layers(model):
        if not ATTENTION.search(layer_path):
            continue
        out, inner = torch_shape(layer)
        down = rng.standard_normal((RANK, inner), dtype=np.float32) / np.float32(np.sqrt(inner))
        up = rng.standard_normal((out, RANK), dtype=np.float32) * np.float32(0.02 / np.sqrt(3 * RANK) * RANK / ALPHA)
        name = "lora_unet_" + layer_path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = np.array(ALPHA, dtype=np.float32)
        factors[layer_path] = (down, up)
    save_file(tensors, str(path))
    return factors


def _copy_bits(a: mx.array) -> mx.array:
    """A copy of ``a``'s bits (a new buffer: the fuse frees ``a`` as it would without the test)."""
    bits = a.view(mx.uint32)
    copy = bits | mx.array(0, dtype=mx.uint32)
    mx.eval(copy)
    return copy


def _same_bits(a: mx.array, b: mx.array) -> bool:
    return a is b or (a.dtype == b.dtype and a.shape == b.shape
                      and mx.array_equal(a.view(mx.uint32), b.view(mx.uint32)).item())


@pytest.mark.slow
@pytest.mark.xdist_group("full_size")
def test_rank32_lora_fused_into_full_size_sdxl_and_removed_bit_for_bit(tmp_path):
    start = time.perf_counter()
    config = UNetConfig.from_preset("sdxl-base")
    unet = random_unet(config, seed=30)
    built_s = time.perf_counter() - start
    factors = write_lora(tmp_path / "rank32.safetensors", unet, seed=31)
    lora = read_lora(tmp_path / "rank32.safetensors")
    assert len(factors) == 560  # 70 transformer blocks x attn1/attn2 x q, k, v, out
    paths = list(factors)  # a sample: the first block's eight, every 37th, the last, the mid block's widest
    sample = {*paths[:8], *paths[::37], paths[-1], next(p for p in paths if "mid_block" in p and "attn2.to_k" in p)}

    # Every parameter before: the untouched ones as they are (the fuse leaves those arrays alone),
    # the touched weights as copies of their bits (so that the fuse frees the originals, as it would
    # without the test), and the sample in numpy float64 for the definition.
    touched = {f"{path}.weight" for path in factors}
    before = {name: _copy_bits(value) if name in touched else value for name, value in tree_flatten(unet.parameters())}
    original = {path: np.array(base_of(layer_at(unet, path)).weight).astype(np.float64) for path in sample}

    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    fuse_start = time.perf_counter()
    applied = apply_lora(unet, lora, scale=SCALE, fuse=True)
    fuse_s = time.perf_counter() - fuse_start
    peak_gib = (mx.get_peak_memory() - resident) / 2**30
    assert applied.modules == len(factors)
    elements = sum(before[name].size for name in touched)
    recorded = sum(u.record.indices.size for u in applied.updates if u.record.indices is not None)
    print(f"\nbuilt in {built_s:.0f} s; fuse {fuse_s:.2f} s (goal {GOAL_SECONDS:g} s), MLX peak {peak_gib:.3f} GiB "
          f"over the resident {resident / 2**30:.2f} GiB (goal {GOAL_PEAK_GIB:g}); {recorded / elements:.2%} of "
          f"{elements / 1e6:.0f} M touched elements recorded")

    # W + scale * alpha / rank * up @ down, in float64.
    for path in sorted(sample):
        down, up = factors[path]
        expected = original[path] + SCALE * ALPHA / RANK * (up.astype(np.float64) @ down)
        fused = np.array(base_of(layer_at(unet, path)).weight).astype(np.float64)
        error = np.abs(fused - expected).max() / np.abs(expected).max()
        assert error <= 1e-6, f"{path}: relative error {error:.1e}"
        assert not np.array_equal(fused, original[path]), path

    remove_start = time.perf_counter()
    applied.remove()
    remove_s = time.perf_counter() - remove_start
    after = dict(tree_flatten(unet.parameters()))
    assert after.keys() == before.keys()
    for name, value in before.items():
        if name in touched:
            assert mx.array_equal(after[name].view(mx.uint32), value).item(), name
        else:
            assert _same_bits(value, after[name]), name
    print(f"remove {remove_s:.2f} s; whole test {time.perf_counter() - start:.0f} s")

    # Sanity bounds only (a shared host's timings are noisy): 4x the goals.
    assert fuse_s < 4 * GOAL_SECONDS and remove_s < 4 * GOAL_SECONDS
    assert peak_gib < 4 * GOAL_PEAK_GIB
