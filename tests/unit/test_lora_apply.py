"""LoRAs applied to a UNet and a text encoder (MLX only): fused and live against the update
computed in numpy from the file's factors, on both code paths; fused removal bit for bit
(several LoRAs, any order, every dtype); all-or-nothing refusals; quantized layers; compiled
forwards. The comparison with diffusers' own loader is in tests/parity/test_lora_diffusers.py."""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from axes import CODE_PATHS, each_value_once
from lora_factors import kohya_file, low_rank_factors, parameters, reference_weights, same_bits
from safetensors.numpy import save_file

from mlx_unet import CLIPTextConfig, CLIPTextModel, InputError, MlxUnetWarning, UNet2DConditionModel, UNetConfig, \
    WeightsError, cpu
from mlx_unet.lora import LoRALayer, apply_lora, read_lora
from mlx_unet.lora.layers import adaptable_layers, layer_at, torch_shape
from mlx_unet.pipelines.run import compiled_forward

TIME_IDS = 6


def _unet(dtype=mx.float32, seed=0, **changes) -> UNet2DConditionModel:
    mx.random.seed(seed)
    config = UNetConfig.from_preset("tiny", **changes)
    unet = UNet2DConditionModel(config)
    unet.update(mlx_tree_cast(unet.parameters(), dtype))
    return cpu.prepare(unet)


def mlx_tree_cast(tree, dtype):
    from mlx.utils import tree_map

    return tree_map(lambda a: a.astype(dtype), tree)


def _inputs(unet, seed=1):
    c = unet.config
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    sample = mx.random.normal((2, 16, 16, c.in_channels), key=k1)
    context = mx.random.normal((2, 7, c.cross_attention_dim), key=k2)
    pooled = c.projection_class_embeddings_input_dim - TIME_IDS * c.addition_time_embed_dim
    extra = dict(text_embeds=mx.random.normal((2, pooled), key=k3), time_ids=mx.array([[64, 64, 0, 0, 64, 64]] * 2))
    return (sample, mx.array([10, 500]), context), extra


def _run(unet, inputs) -> np.ndarray:
    args, extra = inputs
    return np.array(unet(*args, **extra).astype(mx.float32))


def _relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _with_weights(unet, weights: dict) -> UNet2DConditionModel:
    """A copy of ``unet`` (same seed) whose layers get ``weights`` (MLX layout) by hand."""
    copy = _unet()
    for path, value in weights.items():
        layer = layer_at(copy, path)
        layer.weight = type(layer).laid_out(mx.array(value.astype(np.float32))) if hasattr(type(layer), "laid_out") \
            else mx.array(value.astype(np.float32))
    return copy


@pytest.fixture
def lora_file(tmp_path):
    path = tmp_path / "style.safetensors"
    unet = _unet()
    return path, kohya_file(path, unet, rank=3, alpha=1.5, seed=4)


@pytest.mark.parametrize("code_path,fuse", each_value_once(list(CODE_PATHS), [True, False], ids=(
    list(CODE_PATHS), ["fused", "live"])), indirect=["code_path"])
def test_update_matches_the_definition(lora_file, code_path, fuse):
    path, tensors = lora_file
    unet = _unet()
    inputs = _inputs(unet)
    base = _run(unet, inputs)
    reference = _run(_with_weights(unet, reference_weights(unet, tensors, scale=0.7)), inputs)
    applied = apply_lora(unet, path, scale=0.7, fuse=fuse)
    assert applied.modules == len(list(adaptable_layers(_unet())))
    ours = _run(unet, inputs)
    print(f"{'fused' if fuse else 'live'}: {_relative(ours, reference):.2e} (the LoRA changes the output by "
          f"{_relative(base, reference):.2e})")
    assert _relative(base, reference) > 1e-2  # the LoRA matters
    assert _relative(ours, reference) <= 1e-5
    applied.set_scale(0.0)
    # Live at scale 0 adds exact zeros, but on the CPU kernels a LoRA-wrapped upsampler
    # convolution is no longer fused with the upsample (cpu/upsample.py): float32 rounding only.
    exact = not fuse and not cpu.kernels_enabled()
    assert _relative(_run(unet, inputs), base) <= (0.0 if exact else 1e-6)
    applied.remove()
    assert not any(isinstance(layer, LoRALayer) for _, layer in adaptable_layers(unet))


@pytest.mark.parametrize("code_path,fuse", each_value_once(list(CODE_PATHS), [False, True], ids=(
    list(CODE_PATHS), ["live", "fused"])), indirect=["code_path"])  # the other diagonal
def test_half_precision_against_the_float32_definition(lora_file, code_path, fuse):
    path, tensors = lora_file
    unet = _unet()
    inputs = _inputs(unet)
    reference = _run(_with_weights(unet, reference_weights(unet, tensors, scale=0.7)), inputs)
    half = _unet(mx.float16)
    apply_lora(half, path, scale=0.7, fuse=fuse)
    args, extra = inputs
    ours = np.array(half(*(a.astype(mx.float16) if a.dtype == mx.float32 else a for a in args),
                         **{k: v.astype(mx.float16) for k, v in extra.items()}).astype(mx.float32))
    print(f"float16 {'fused' if fuse else 'live'} vs float32 definition: {_relative(ours, reference):.2e}")
    assert np.isfinite(ours).all() and _relative(ours, reference) <= 1e-2


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_fuse_and_remove_restore_every_bit(lora_file, dtype):
    path, _ = lora_file
    unet = _unet(dtype)
    # Zeros of both signs: subtraction gives +0.0 back for -0.0.
    unet.conv_in.weight = mx.concatenate([mx.zeros_like(unet.conv_in.weight[:1]) * -1.0, unet.conv_in.weight[1:]])
    before = parameters(unet)
    first = apply_lora(unet, path, scale=0.9)
    second = apply_lora(unet, path, scale=-2.5)
    live = apply_lora(unet, path, scale=0.3, fuse=False)
    assert not same_bits(before, parameters(unet))
    live.remove()
    first.remove()  # the first of two fused: the second is taken off and put back
    only_second = parameters(unet)
    second.remove()
    assert same_bits(before, parameters(unet))
    alone = apply_lora(unet, path, scale=-2.5)
    assert same_bits(only_second, parameters(unet))  # as if the first had never been fused
    alone.remove()
    assert same_bits(before, parameters(unet))


def test_a_rejected_lora_changes_nothing(tmp_path):
    unet = _unet()
    before = parameters(unet)
    good = kohya_file(tmp_path / "good.safetensors", unet, seed=1)
    name = "lora_unet_conv_out"

    def refused(tensors, *words, error=WeightsError):
        save_file(tensors, str(tmp_path / "bad.safetensors"))
        with pytest.raises(error) as caught:
            apply_lora(unet, tmp_path / "bad.safetensors", fuse=False)
        for word in words:
            assert word in str(caught.value), (word, str(caught.value))
        assert same_bits(before, parameters(unet))
        assert not any(isinstance(layer, LoRALayer) for _, layer in adaptable_layers(unet))

    refused({**good, f"{name}.lora_up.weight": good[f"{name}.lora_up.weight"][:1]}, name, "update for a")
    refused({**good, f"{name}.lora_up.weight": good[f"{name}.lora_up.weight"][:, :2]}, name, "does not fit its down")
    nan = good[f"{name}.lora_down.weight"].copy()
    nan[0, 0, 0, 0] = np.nan
    refused({**good, f"{name}.lora_down.weight": nan}, name, "NaN")
    kernel = good[f"{name}.lora_down.weight"][:, :, :1, :1]
    refused({**good, f"{name}.lora_down.weight": kernel}, "lora_unet_conv_out makes a 4x32 update for a 4x32x3x3 weight")


def test_a_lora_for_another_family_is_named(tmp_path):
    """An SD 1.x LoRA (768-wide text) on an SDXL-wide UNet, and the other way round."""
    sd15, sdxl = _unet(cross_attention_dim=768), _unet(cross_attention_dim=2048)
    kohya_file(tmp_path / "sd15.safetensors", sd15)
    kohya_file(tmp_path / "sdxl.safetensors", sdxl)
    with pytest.raises(WeightsError, match=r"sd15.safetensors is a LoRA for SD 1.x \(768-wide text\), and this UNet is "
                                           r"SDXL base; use a LoRA made for this model."):
        apply_lora(sdxl, tmp_path / "sd15.safetensors")
    with pytest.raises(WeightsError, match=r"a LoRA for SDXL base \(2048-wide text\), and this UNet is SD 1.x"):
        apply_lora(sd15, tmp_path / "sdxl.safetensors")


def test_modules_naming_no_layer_are_listed(tmp_path):
    unet = _unet()
    tensors = kohya_file(tmp_path / "x.safetensors", unet, only=lambda p: p.startswith("down_blocks.0"))
    extra = {"lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight": np.ones((2, 4), np.float32),
             "lora_unet_down_blocks_9_resnets_0_conv1.lora_up.weight": np.ones((4, 2), np.float32)}
    save_file({**tensors, **extra}, str(tmp_path / "some.safetensors"))
    with pytest.warns(MlxUnetWarning, match=r"1 of \d+ modules of some.safetensors name no layer .*down_blocks_9"):
        apply_lora(unet, tmp_path / "some.safetensors").remove()
    save_file(extra, str(tmp_path / "none.safetensors"))
    with pytest.raises(WeightsError, match="none of the 1 modules of none.safetensors .* names a layer"):
        apply_lora(unet, tmp_path / "none.safetensors")
    with pytest.raises(WeightsError, match="has no text_encoder_2 modules"):
        apply_lora(CLIPTextModel(CLIPTextConfig.from_preset("tiny-clip-bigg")), tmp_path / "x.safetensors")


def test_quantized_layers_take_live_loras_only(tmp_path):
    unet = _unet()
    path = tmp_path / "q.safetensors"
    tensors = kohya_file(path, unet, only=lambda p: p.endswith(("to_q", "ff.net.2")))
    nn.quantize(unet, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, nn.Linear)
                and m.weight.shape[1] % 32 == 0 and p.endswith(("to_q", "ff.net.2")))
    inputs = _inputs(unet)
    base = _run(unet, inputs)
    with pytest.raises(InputError, match="quantized.*live"):
        apply_lora(unet, path)
    applied = apply_lora(unet, path, scale=0.5, fuse=False)
    live = _run(unet, inputs)
    # Reference: the quantized layer's own output plus the update applied by hand to its input.
    layer_path = next(p for p, layer in adaptable_layers(unet) if p.endswith("to_q"))
    wrapped = layer_at(unet, layer_path)
    assert isinstance(wrapped.base, nn.QuantizedLinear)
    x = mx.random.normal((3, torch_shape(wrapped)[1]))
    name = "lora_unet_" + layer_path.replace(".", "_")
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    expected = np.array(wrapped.base(x)) + 0.5 * (np.array(x) @ down.T @ up.T) * 2.0 / down.shape[0]
    assert np.abs(np.array(wrapped(x)) - expected).max() <= 1e-5 * np.abs(expected).max()
    assert _relative(live, base) > 1e-3
    applied.remove()
    assert np.array_equal(_run(unet, inputs), base)


@pytest.mark.usefixtures("code_path")
def test_compiled_forward_follows_live_loras(lora_file):
    path, _ = lora_file
    unet = _unet()
    inputs = _inputs(unet)
    forward = compiled_forward(unet)
    base = _run(forward, inputs)
    applied = apply_lora(unet, path, scale=0.6, fuse=False)
    assert _relative(_run(forward, inputs), _run(unet, inputs)) <= 1e-6
    applied.set_scale(-0.4)  # an array in the tree: read at every call, no new trace
    assert _relative(_run(forward, inputs), _run(unet, inputs)) <= 1e-6
    applied.remove()
    assert _relative(_run(forward, inputs), base) <= 1e-6


@pytest.mark.usefixtures("code_path")
def test_text_encoder_loras_and_open_clips_fused_in_proj(tmp_path):
    """A LoRA written against open_clip's fused in_proj equals three LoRAs on q, k and v whose up
    matrices are its thirds."""
    mx.random.seed(3)
    encoder = cpu.prepare(CLIPTextModel(CLIPTextConfig.from_preset("tiny-clip-bigg")))
    width = encoder.config.hidden_size
    rng = np.random.default_rng(5)
    fused, split = {}, {}
    for i in range(encoder.config.num_hidden_layers):
        down, up = low_rank_factors((3 * width, width), 4, rng)
        fused[f"lora_te2_transformer_resblocks_{i}_attn_in_proj.lora_down.weight"] = down
        fused[f"lora_te2_transformer_resblocks_{i}_attn_in_proj.lora_up.weight"] = up
        for j, projection in enumerate(("q_proj", "k_proj", "v_proj")):
            name = f"text_encoder_2.text_model.encoder.layers.{i}.self_attn.{projection}"
            split[f"{name}.lora_A.weight"], split[f"{name}.lora_B.weight"] = down, up[j * width:(j + 1) * width]
    save_file(fused, str(tmp_path / "fused.safetensors"))
    save_file(split, str(tmp_path / "split.safetensors"))
    ids = mx.array([[49406, 3, 9, 27, 49407, 49407]])
    base = np.array(encoder(ids)[0])
    outputs = []
    for name in ("fused", "split"):
        for fuse in (True, False):
            applied = apply_lora(encoder, read_lora(tmp_path / f"{name}.safetensors"), fuse=fuse)
            assert applied.part == "text_encoder_2" and applied.modules == 3 * encoder.config.num_hidden_layers
            outputs.append(np.array(encoder(ids)[0]))
            applied.remove()
    assert _relative(outputs[0], base) > 1e-2
    for other in outputs[1:]:
        assert _relative(other, outputs[0]) <= 1e-5


def test_scales_are_checked():
    with pytest.raises(InputError, match="scale must be a finite number"):
        apply_lora(_unet(), "unused.safetensors", scale=float("inf"))


def test_warnings_do_not_hide(tmp_path):
    """The unmatched-modules warning is an MlxUnetWarning: the commands print it in one line."""
    unet = _unet()
    tensors = kohya_file(tmp_path / "x.safetensors", unet, only=lambda p: p == "conv_in")
    tensors["lora_unet_nothing.lora_down.weight"] = np.ones((1, 2), np.float32)
    tensors["lora_unet_nothing.lora_up.weight"] = np.ones((2, 1), np.float32)
    save_file(tensors, str(tmp_path / "y.safetensors"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        apply_lora(unet, tmp_path / "y.safetensors")
    assert [w.category for w in seen] == [MlxUnetWarning]
