"""SDXL base at its full size (2.57 B parameters) against diffusers, at the CFG batch shape.

Both copies of the weights (10.3 GB each in float32) do not fit beside each other on a 24 GB
machine, so diffusers runs first and its weights are handed over to MLX tensor by tensor.
"""


import mlx.core as mx
import numpy as np
import pytest
from reference import make_inputs, mlx_weights, relative_error, release_memory, run_mlx, run_torch, torch_unet

from mlx_unet import UNet2DConditionModel, UNetConfig, cpu
from mlx_unet.weights import load_weights


@pytest.mark.slow
@pytest.mark.xdist_group("full_size")
def test_sdxl_base_full_size_fp32_batch2():
    config = UNetConfig.from_preset("sdxl-base")
    # Batch 2 as classifier-free guidance runs it: two timesteps, 77 text tokens, 32x32 latent.
    inputs = make_inputs(config, 2, 32, 32, seed=21, tokens=77, timesteps=[999.0, 261.0])
    reference = torch_unet(config, seed=20)
    expected = run_torch(reference, inputs)
    state = reference.state_dict()
    del reference
    release_memory()

    ours = UNet2DConditionModel(config)
    load_weights(ours, mlx_weights(state, consume=True))
    del state
    cpu.prepare(ours)  # the default code path: at full size the plain one's float16 takes hours here
    out = run_mlx(ours, inputs)

    assert np.isfinite(expected).all() and np.abs(expected).max() > 0.1
    print(f"float32 against diffusers float32: {relative_error(out, expected):.1e}")
    assert relative_error(out, expected) <= 1e-4

    # The same weights rounded to float16, activations in float16 (fp32 where it matters):
    # finite at SDXL's full depth and within half-precision error of the fp32 reference.
    ours.set_dtype(mx.float16)
    release_memory()
    half = run_mlx(ours, inputs)
    assert np.isfinite(half).all()
    print(f"float16 against diffusers float32: {relative_error(half, expected):.1e}")
    assert relative_error(half, expected) <= 1e-2
