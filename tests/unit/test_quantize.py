"""Quantized models (MLX only): the policy, loading a dense folder quantized with no dense copy,
the estimate of their bytes, the CPU kernel, and live LoRAs over quantized layers against the
dense model with the LoRA fused. Fidelity against dense models: tests/parity/test_quantize_fidelity.py."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from lora_factors import kohya_file
from mlx.utils import tree_flatten, tree_map

from mlx_unet import CLIPTextConfig, CLIPTextModel, ConfigError, InputError, UNet2DConditionModel, UNetConfig, WeightsError, \
    cpu
from mlx_unet.configs.base import SECTION, section
from mlx_unet.configs.quantization import Quantization, mode_available, text_encoder_quantization
from mlx_unet.lora import apply_lora
from mlx_unet.pipelines import model_sizes
from mlx_unet.quantize import ATTENTION, DENSE_AT_8_BITS, EMBEDDINGS, FEED_FORWARD, PROJECTIONS, layer_group, \
    prepare_structure, quantizable_paths

Q4 = Quantization.make(4)
# A UNet wide enough that its weights dominate MLX's bookkeeping in peak-memory figures.
WIDE = dict(block_out_channels=[128, 256, 256], attention_head_dim=[2, 4, 4])


def _save(folder, model, config_dict):
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config_dict))
    return folder


def _dense_folder(folder, **changes):
    mx.random.seed(0)
    config = UNetConfig.from_preset("tiny", **changes)
    model = UNet2DConditionModel(config)
    model.update(tree_map(lambda a: a.astype(mx.float16), model.parameters()))
    return _save(folder, model, config.to_dict())


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    return _dense_folder(tmp_path_factory.mktemp("q") / "unet", **WIDE)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return _dense_folder(tmp_path_factory.mktemp("q") / "unet")


def _inputs(config, seed=1):
    """One small latent: on the plain path MLX's CPU float16 and quantized products are slow."""
    k = mx.random.split(mx.random.key(seed), 3)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return ((mx.random.normal((1, 8, 8, 4), key=k[0]).astype(mx.float16), mx.array([600]),
             mx.random.normal((1, 7, config.cross_attention_dim), key=k[1]).astype(mx.float16)),
            dict(text_embeds=mx.random.normal((1, pooled), key=k[2]).astype(mx.float16),
                 time_ids=mx.array([[64, 64, 0, 0, 64, 64]])))


def _run(model, inputs) -> np.ndarray:
    return np.array(model(*inputs[0], **inputs[1]).astype(mx.float32))


def _relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_the_policy_by_group():
    model = UNet2DConditionModel(UNetConfig.from_preset("sdxl-base"))  # lazily: no weight is computed
    paths = quantizable_paths(model, Q4)
    # Every Linear group at 4 bits (the 1.8 GiB budget); proj_in/out and the embeddings dense at 8.
    assert {layer_group(p) for p in paths} == {ATTENTION, FEED_FORWARD, PROJECTIONS, EMBEDDINGS}
    eight = {layer_group(p) for p in quantizable_paths(model, Quantization.make(8, 64))}
    assert eight == {ATTENTION, FEED_FORWARD} and DENSE_AT_8_BITS == {PROJECTIONS, EMBEDDINGS}
    assert layer_group("down_blocks.1.resnets.0.time_emb_proj") == EMBEDDINGS
    assert layer_group("down_blocks.1.resnets.0.conv1") == "convolutions" and not any("conv" in p for p in paths)
    # A layer whose input width the group does not divide stays dense.
    odd = UNet2DConditionModel(UNetConfig.from_preset("tiny", cross_attention_dim=40))
    assert not any(p.endswith("attn2.to_k") for p in quantizable_paths(odd, Quantization.make(4, 32)))
    assert text_encoder_quantization(Q4) == Quantization.make(8, 64)
    assert text_encoder_quantization(Q4, False) is None and text_encoder_quantization(None) is None
    # Bits asked for the text encoders follow the UNet's family: its group size, or mxfp beside mxfp.
    assert text_encoder_quantization(Quantization.make(8, 32), "4") == Quantization.make(4, 32)
    assert text_encoder_quantization(Q4, "none") is None
    if mode_available("mxfp4"):
        assert text_encoder_quantization(Quantization.make(4, 32, "mxfp4")) == Quantization.make(8, 32, "mxfp8")
        assert text_encoder_quantization(Quantization.make(4, 32, "mxfp4"), 4) == Quantization.make(4, 32, "mxfp4")


@pytest.mark.parametrize("q", [Q4, Quantization.make(8, 32), Quantization.make(4, 32, "mxfp4")],
                         ids=["affine4-g64", "affine8-g32", "mxfp4"])
@pytest.mark.parametrize("config", [UNetConfig.from_preset("sdxl-base"), UNetConfig.from_preset("sd15"),
                                    UNetConfig.from_preset("tiny")], ids=["sdxl-base", "sd15", "tiny"])
def test_the_estimate_counts_quantized_bytes_exactly(config, q):
    model = UNet2DConditionModel(config)  # lazily
    prepare_structure(model, q, quantizable_paths(model, q))
    floats = tree_map(lambda a: a.astype(mx.float16) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters())
    assert model_sizes.unet_bytes(config, 2, q) == sum(v.nbytes for _, v in tree_flatten(floats))
    clip = CLIPTextModel(CLIPTextConfig.from_preset("sdxl-clip-bigg"))
    prepare_structure(clip, q, quantizable_paths(clip, q))
    bigg = CLIPTextConfig.from_preset("sdxl-clip-bigg")
    assert model_sizes.text_encoder_bytes(bigg, 4, q) == sum(v.nbytes for _, v in tree_flatten(clip.parameters()))


@pytest.mark.usefixtures("code_path")
def test_a_dense_folder_quantized_as_it_loads(dense_folder):
    dense = UNet2DConditionModel.from_pretrained(dense_folder)
    mx.eval(dense.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()  # the dense model above
    quantized = UNet2DConditionModel.from_pretrained(dense_folder, quantize=Q4)
    peak = mx.get_peak_memory() - before
    size = sum(v.nbytes for _, v in tree_flatten(quantized.parameters()))
    dense_size = sum(v.nbytes for _, v in tree_flatten(dense.parameters()))
    largest = max(v.nbytes for _, v in tree_flatten(dense.parameters()))
    print(f"quantized {size / 2**20:.1f} MiB (dense {dense_size / 2**20:.1f}); "
          f"peak while loading {peak / 2**20:.1f} MiB")
    # The quantized model plus about one dense layer at a time (its float32 working copies too): never the dense model.
    assert peak < size + 8 * largest and peak < dense_size
    layers = [m for _, m in quantized.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(layers) == len(quantizable_paths(UNet2DConditionModel(dense.config), Q4))
    assert all(isinstance(m, cpu.quantized.QuantizedLinear) == cpu.kernels_enabled() for m in layers)
    # The same parameters as quantizing the loaded dense model.
    by_hand = UNet2DConditionModel.from_pretrained(dense_folder, cpu_kernels=False)
    paths = quantizable_paths(by_hand, Q4)
    nn.quantize(by_hand, 64, 4, class_predicate=lambda p, m: p in paths)
    ours = dict(tree_flatten(UNet2DConditionModel.from_pretrained(dense_folder, quantize=Q4,
                                                                  cpu_kernels=False).parameters()))
    theirs = dict(tree_flatten(by_hand.parameters()))
    assert ours.keys() == theirs.keys() and all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)


def test_a_quantized_folder_loads_quantized_and_is_not_quantized_again(dense_folder, tmp_path):
    model = UNet2DConditionModel.from_pretrained(dense_folder, quantize=Q4, cpu_kernels=False)
    config = json.loads((dense_folder / "config.json").read_text())
    config[SECTION] = section(Q4.to_dict())
    folder = _save(tmp_path / "q4", model, config)
    loaded = UNet2DConditionModel.from_pretrained(folder, cpu_kernels=False)
    ours, saved = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(model.parameters()))
    assert ours.keys() == saved.keys() and all(mx.array_equal(v, saved[k]).item() for k, v in ours.items())
    with pytest.raises(WeightsError, match=r"is quantized already \(4-bit affine, groups of 64\), so it cannot be "
                                           r"quantized to 8-bit affine, groups of 64"):
        UNet2DConditionModel.from_pretrained(folder, quantize=8)
    assert UNet2DConditionModel.from_pretrained(folder, quantize=Q4) is not None  # the same: fine


def test_a_mode_this_mlx_lacks_is_one_sentence(monkeypatch, dense_folder, tmp_path):
    import mlx_unet.configs.quantization as quantization

    config = json.loads((dense_folder / "config.json").read_text())
    config[SECTION] = section({"bits": 4, "group_size": 32, "mode": "mxfp4"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(quantization, "mode_available", lambda mode: False)
    with pytest.raises(ConfigError, match=r"the installed MLX .* has no mxfp4 quantization; upgrade MLX"):
        UNetConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="affine quantization takes groups of 32 or 64 or 128 weights, got 48"):
        Quantization.make(4, 48)


@pytest.mark.usefixtures("code_path")
def test_a_live_lora_over_quantized_layers_matches_the_dense_model_with_it_fused(small_folder, tmp_path):
    """Within what quantization itself changes: the LoRA's own update is exact in both."""
    dense = UNet2DConditionModel.from_pretrained(small_folder)
    quantized = UNet2DConditionModel.from_pretrained(small_folder, quantize=Q4)
    inputs = _inputs(dense.config, seed=4)
    quantization_error = _relative(_run(quantized, inputs), _run(dense, inputs))
    kohya_file(tmp_path / "l.safetensors", UNet2DConditionModel.from_pretrained(small_folder, cpu_kernels=False),
               rank=4, seed=2)
    apply_lora(dense, tmp_path / "l.safetensors", scale=0.8)
    before = dict(tree_flatten(quantized.parameters()))
    with pytest.raises(InputError, match=r"is quantized, and fusing a LoRA into quantized weights would round it "
                                         r"away; load the LoRA live \(fuse=False, --lora-mode live\)\."):
        apply_lora(quantized, tmp_path / "l.safetensors", scale=0.8)  # fusing, the default
    after = dict(tree_flatten(quantized.parameters()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # nothing touched
    apply_lora(quantized, tmp_path / "l.safetensors", scale=0.8, fuse=False)
    with_lora = _run(dense, inputs)
    error = _relative(_run(quantized, inputs), with_lora)
    change = _relative(with_lora, _run(UNet2DConditionModel.from_pretrained(small_folder), inputs))
    print(f"quantized + live LoRA vs dense + fused LoRA: {error:.3e}; quantization alone {quantization_error:.3e}; "
          f"the LoRA changes the output by {change:.2e}")
    # Measured: 8.5e-2 against 6.8e-2 for 4-bit tiny random weights, which quantize worse than
    # trained ones; the LoRA's activations carry the model's quantization error on.
    assert change > 3 * quantization_error  # the LoRA matters more than the quantization noise
    assert error <= 2 * quantization_error
    assert math.isfinite(error)
