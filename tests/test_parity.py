"""Our UNet against diffusers' on the same seeded weights and inputs, every family at tiny width."""

import mlx.core as mx
import numpy as np
import pytest
from reference import (
    TIME_IDS,
    TINY_FAMILIES,
    make_inputs,
    mlx_from_torch,
    relative_error,
    run_mlx,
    run_torch,
    tiny_config,
    torch_unet,
)

FP32_BOUND = 1e-4
FP16_BOUND = 1e-2


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def family(request):
    config = tiny_config(request.param)
    reference = torch_unet(config, seed=1)
    return request.param, config, reference, mlx_from_torch(reference, config)


def _inputs(name, config, height=16, width=16, **kw):
    return make_inputs(config, 2, height, width, n_time_ids=TIME_IDS.get(name), **kw)


def test_fp32_matches_diffusers_with_per_item_timesteps(family):
    name, config, reference, ours = family
    inputs = _inputs(name, config, timesteps=[1.0, 981.0])
    assert relative_error(run_mlx(ours, inputs), run_torch(reference, inputs)) <= FP32_BOUND


@pytest.mark.parametrize("height,width", [(36, 44), (40, 40), (33, 27), (30, 34)])
def test_fp32_odd_latent_sizes(family, height, width):
    """36x44 and 40x40 are multiples of the downsampling; 33x27 and 30x34 are not, so the
    upsamplers must target the skip sizes instead of doubling."""
    name, config, reference, ours = family
    inputs = _inputs(name, config, height, width, seed=2, timesteps=[500.0, 12.0])
    assert relative_error(run_mlx(ours, inputs), run_torch(reference, inputs)) <= FP32_BOUND


@pytest.mark.parametrize("timestep", [0, 999, 457.25, [321.5], [7]], ids=["int0", "int999", "float", "float(1,)", "int(1,)"])
def test_fp32_timestep_forms(family, timestep):
    name, config, reference, ours = family
    inputs = _inputs(name, config, seed=3, timesteps=timestep)
    assert relative_error(run_mlx(ours, inputs), run_torch(reference, inputs)) <= FP32_BOUND


def test_integer_timestep_array_equals_float(family):
    name, config, _, ours = family
    inputs = _inputs(name, config, seed=4)
    as_float = run_mlx(ours, {**inputs, "timestep": np.asarray([250.0, 750.0], np.float32)})
    as_int = run_mlx(ours, {**inputs, "timestep": np.asarray([250, 750], np.int32)})
    np.testing.assert_array_equal(as_float, as_int)


def test_fp16_weights_and_activations(family):
    name, config, reference, _ = family
    ours16 = mlx_from_torch(reference, config, dtype=mx.float16)
    inputs = _inputs(name, config, seed=5, timesteps=[40.0, 960.0])
    out = run_mlx(ours16, inputs)
    assert np.isfinite(out).all()
    assert relative_error(out, run_torch(reference, inputs)) <= FP16_BOUND


def test_bf16_runs_finite(family):
    name, config, reference, _ = family
    ours = mlx_from_torch(reference, config, dtype=mx.bfloat16)
    out = ours(mx.zeros((1, 16, 16, config.in_channels), mx.bfloat16), 500,
               mx.zeros((1, 3, config.cross_attention_dim)),
               **_added_zeros(name, config))
    assert out.dtype == mx.bfloat16 and bool(mx.all(mx.isfinite(out)))


def _added_zeros(name, config):
    if not config.has_text_time_embedding:
        return {}
    n = TIME_IDS.get(name, 6)
    pooled = config.projection_class_embeddings_input_dim - n * config.addition_time_embed_dim
    return {"text_embeds": mx.zeros((1, pooled)), "time_ids": mx.zeros((1, n))}


# Every architecture field the config honours, at values no family preset uses, in two configs:
# a mistake in how any of them is read changes the output.
UNUSUAL_FIELDS = {
    "nested-depths": ("tiny", {
        "transformer_layers_per_block": [[1, 1], [2, 1], [1, 3]],
        "reverse_transformer_layers_per_block": [[1, 2, 3], [2, 1, 1], [1, 1, 1]],
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "conv_in_kernel": 5,
        "conv_out_kernel": 1,
        "mid_block_scale_factor": 1.414,
        "norm_eps": 1e-3,
        "time_embedding_dim": 96,
        "center_input_sample": True,
    }),
    "no-mid-block": ("sd15", {
        "block_out_channels": [32, 48, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": [1, 2, 3],
        "attention_head_dim": [4, 2, 8],
        "mid_block_type": None,
        "norm_num_groups": 16,
        "cross_attention_dim": 24,
        "out_channels": 3,
        "in_channels": 5,
    }),
}


@pytest.mark.parametrize("case", list(UNUSUAL_FIELDS))
def test_fp32_unusual_architecture_fields(case):
    preset, changes = UNUSUAL_FIELDS[case]
    from mlx_unet import UNetConfig

    config = UNetConfig.from_preset(preset, **changes)
    reference = torch_unet(config, seed=6)
    ours = mlx_from_torch(reference, config)
    for height, width in ((16, 16), (19, 26)):
        inputs = make_inputs(config, 2, height, width, seed=7, timesteps=[3.0, 640.0])
        assert relative_error(run_mlx(ours, inputs), run_torch(reference, inputs)) <= FP32_BOUND
