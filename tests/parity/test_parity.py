"""Our UNet against diffusers' on the same seeded weights and inputs, every family at tiny width,
on both code paths (``code_path``: the CPU kernels, and the plain MLX a Mac runs)."""

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch
from axes import CODE_PATHS, each_value_once
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

from mlx_unet import cpu
from mlx_unet.models.attention import ScaledDotProductAttention

FP32_BOUND = 1e-4
FP16_BOUND = 1e-2

# What depends on the code path runs on both (``code_path``: the CPU kernels, and the plain MLX
# a Mac runs); timestep forms and the per-tap convolution's size cases run on the default one.
both_paths = pytest.mark.usefixtures("code_path")
# Half precision: every family and both paths in the fast tier, their whole product in the slow.
half_precision_cases = pytest.mark.parametrize(
    "reference_family,code_path", each_value_once(list(TINY_FAMILIES), list(CODE_PATHS)), indirect=True)


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def reference_family(request):
    config = tiny_config(request.param)
    return request.param, config, torch_unet(config, seed=1)


@pytest.fixture
def family(reference_family):
    """Ours built in the test, so that it takes the test's code path."""
    name, config, reference = reference_family
    return name, config, reference, mlx_from_torch(reference, config)


def _inputs(name, config, height=16, width=16, **kw):
    return make_inputs(config, 2, height, width, n_time_ids=TIME_IDS.get(name), **kw)


@both_paths
@pytest.mark.parametrize("height,width", [(16, 16), pytest.param(33, 27, marks=pytest.mark.slow)])
def test_fp32_matches_diffusers_with_per_item_timesteps(family, height, width):
    name, config, reference, ours = family
    inputs = _inputs(name, config, height, width, timesteps=[1.0, 981.0])
    assert relative_error(run_mlx(ours, inputs), run_torch(reference, inputs)) <= FP32_BOUND


# 33x27 in the fast tier: the case the others are easier forms of.
@pytest.mark.parametrize("height,width", [pytest.param(36, 44, marks=pytest.mark.slow),
                                          pytest.param(40, 40, marks=pytest.mark.slow), (33, 27),
                                          pytest.param(30, 34, marks=pytest.mark.slow)])
def test_fp32_odd_latent_sizes(family, height, width):
    """36x44 and 40x40 are multiples of the downsampling; 33x27 and 30x34 are not, so the
    upsamplers must target the skip sizes instead of doubling."""
    name, config, reference, ours = family
    inputs = _inputs(name, config, height, width, seed=2, timesteps=[500.0, 12.0])
    assert relative_error(run_mlx(ours, inputs), run_torch(reference, inputs)) <= FP32_BOUND


@pytest.mark.parametrize("timestep", [0, pytest.param(999, marks=pytest.mark.slow),
                                      pytest.param(457.25, marks=pytest.mark.slow), [321.5],
                                      pytest.param([7], marks=pytest.mark.slow)],
                         ids=["int0", "int999", "float", "float(1,)", "int(1,)"])
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


@half_precision_cases
def test_fp16_weights_and_activations(reference_family, code_path):
    name, config, reference = reference_family
    ours16 = mlx_from_torch(reference, config, dtype=mx.float16)
    inputs = _inputs(name, config, seed=5, timesteps=[40.0, 960.0])
    out = run_mlx(ours16, inputs)
    assert np.isfinite(out).all()
    assert relative_error(out, run_torch(reference, inputs)) <= FP16_BOUND


@half_precision_cases
def test_bf16_is_as_close_to_float32_as_diffusers_bf16(reference_family, code_path):
    """bfloat16 keeps 8 bits: the bound is what diffusers itself loses in bfloat16 (its own
    bf16 forward against its float32 one, computed here), with a factor 2 of slack."""
    name, config, reference = reference_family
    inputs = _inputs(name, config, seed=8, timesteps=[80.0, 920.0])
    exact = run_torch(reference, inputs)
    ours = run_mlx(mlx_from_torch(reference, config, dtype=mx.bfloat16), inputs)
    theirs = run_torch(copy.deepcopy(reference).to(torch.bfloat16), inputs)
    assert np.isfinite(ours).all()
    assert relative_error(ours, exact) <= 2 * relative_error(theirs, exact)


@pytest.mark.parametrize("upcast", [True, False])
@both_paths
def test_upcast_attention_runs_attention_in_float32(upcast, monkeypatch):
    """SD 2.x's upcast_attention: a float16 model hands float32 queries, keys and values to the
    attention kernel (on the plain path that is mx.fast's, which on Metal computes in the input
    dtype), and the output still matches diffusers."""
    config = tiny_config("sd2", upcast_attention=upcast)
    reference = torch_unet(config, seed=9)
    ours = mlx_from_torch(reference, config, dtype=mx.float16)
    seen = set()
    attend = ScaledDotProductAttention.__call__
    monkeypatch.setattr(ScaledDotProductAttention, "__call__",
                        lambda self, q, k, v, scale: seen.add(q.dtype) or attend(self, q, k, v, scale))
    inputs = make_inputs(config, 2, 16, 16, seed=10, timesteps=[30.0, 700.0])
    out = run_mlx(ours, inputs)
    assert relative_error(out, run_torch(reference, inputs)) <= FP16_BOUND
    # The CPU kernels' attention computes in float32 either way; the plain path's is the one
    # the flag changes (off the CPU both code_path settings run the plain path).
    assert seen == (set() if cpu.kernels_enabled() else {mx.float32 if upcast else mx.float16})


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


@both_paths
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
