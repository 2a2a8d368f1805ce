"""The compiled forward, the low-memory mode, and what the sampler computes once per run."""

import mlx.core as mx
import numpy as np
import pytest
from reference import make_inputs, mlx_from_torch, relative_error, run_mlx, run_torch, tiny_config, torch_unet

from mlx_unet import Sampler, make_scheduler
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG


@pytest.fixture(scope="module")
def models():
    config = tiny_config("sdxl-base")
    reference = torch_unet(config, seed=30)
    return config, reference, mlx_from_torch(reference, config)


def _count_traces(unet) -> list:
    """Count the Python runs of the forward: with mx.compile, one per trace."""
    traces = []
    original = unet._denoise

    def counted(*args):
        traces.append([a.shape for a in args])
        return original(*args)

    unet._denoise = counted
    return traces


def test_compiled_forward_matches_diffusers_and_traces_once_per_shape_and_dtype(models):
    config, reference, _ = models
    unet = mlx_from_torch(reference, config)
    traces = _count_traces(unet)
    unet.compile()
    inputs = make_inputs(config, 2, 16, 16, seed=31, timesteps=[999.0, 10.0])
    assert relative_error(run_mlx(unet, inputs), run_torch(reference, inputs)) <= 1e-4
    assert len(traces) == 1

    # New timesteps, prompts, time ids and latents of the same shapes: no new trace; nor asking
    # again for compilation (each Sampler, so each image, does).
    unet.compile(False).compile()
    for seed, t in ((32, [500.0, 1.0]), (33, 250), (34, [3.0, 700.0])):
        again = make_inputs(config, 2, 16, 16, seed=seed, timesteps=t)
        assert relative_error(run_mlx(unet, again), run_torch(reference, again)) <= 1e-4
    assert len(traces) == 1

    run_mlx(unet, make_inputs(config, 2, 24, 16, seed=35))  # new resolution
    assert len(traces) == 2
    run_mlx(unet, make_inputs(config, 1, 24, 16, seed=36))  # new batch
    assert len(traces) == 3
    unet.set_dtype(mx.float16)  # new dtype
    half = run_mlx(unet, make_inputs(config, 1, 24, 16, seed=36))
    assert len(traces) == 4 and np.isfinite(half).all()


def test_compiled_forward_reads_the_current_weights(models):
    config, reference, ours = models
    unet = mlx_from_torch(reference, config).compile()
    inputs = make_inputs(config, 1, 16, 16, seed=37)
    before = run_mlx(unet, inputs)
    unet.conv_out.bias = unet.conv_out.bias + 1.0  # same shape: no new trace, new values used
    np.testing.assert_allclose(run_mlx(unet, inputs), before + 1.0, rtol=1e-5, atol=1e-5)
    unet.compile(False)
    np.testing.assert_allclose(run_mlx(unet, inputs), before + 1.0, rtol=1e-5, atol=1e-5)


def _cache_limit() -> int:
    current = mx.set_cache_limit(0)
    mx.set_cache_limit(current)
    return current


def test_low_memory_mode_gives_the_same_output_and_restores_the_cache_limit(models):
    config, reference, ours = models
    inputs = make_inputs(config, 2, 16, 16, seed=38)
    normal = run_mlx(ours, inputs)
    limit = mx.set_cache_limit(3 << 30)
    try:
        ours.low_memory()
        assert _cache_limit() == int(0.25 * 2**30)
        np.testing.assert_array_equal(run_mlx(ours, inputs), normal)
        ours.low_memory(False)
        assert _cache_limit() == 3 << 30
    finally:
        ours.low_memory(False)
        mx.set_cache_limit(limit)


def test_added_embedding_can_be_passed_precomputed(models):
    config, reference, ours = models
    inputs = make_inputs(config, 2, 16, 16, seed=39)
    expected = run_torch(reference, inputs)
    added = ours.added_embedding(mx.array(inputs["text_embeds"]), mx.array(inputs["time_ids"]))
    out = ours(mx.array(inputs["sample"]), mx.array(inputs["timestep"]), mx.array(inputs["encoder_hidden_states"]),
               added_embedding=added)
    assert relative_error(np.array(out), expected) <= 1e-4


def test_sampler_computes_the_added_embedding_once_per_run(models):
    config, _, ours = models
    calls = []
    original = ours.added_embedding
    ours.added_embedding = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        rng = np.random.default_rng(40)
        prompt = mx.array(rng.normal(size=(1, 7, config.cross_attention_dim)).astype(np.float32))
        pooled = mx.array(rng.normal(size=(1, config.projection_class_embeddings_input_dim - 6 * 8)).astype(np.float32))
        sampler = Sampler(ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG))
        sampler(prompt, pooled, num_inference_steps=4, height=128, width=128, seed=1)
    finally:
        del ours.added_embedding
    assert len(calls) == 1


def test_low_memory_sampler_matches_the_batched_one(models):
    config, _, ours = models
    rng = np.random.default_rng(41)
    prompt = mx.array(rng.normal(size=(1, 7, config.cross_attention_dim)).astype(np.float32))
    pooled = mx.array(rng.normal(size=(1, config.projection_class_embeddings_input_dim - 6 * 8)).astype(np.float32))
    scheduler = SDXL_SCHEDULER_CONFIG
    kwargs = dict(num_inference_steps=3, height=128, width=128, seed=2, guidance_scale=6.0)
    batched = Sampler(ours, make_scheduler("euler", scheduler))(prompt, pooled, **kwargs)
    one_by_one = Sampler(ours, make_scheduler("euler", scheduler), low_memory=True)(prompt, pooled, **kwargs)
    ours.low_memory(False)
    assert relative_error(np.array(one_by_one), np.array(batched)) <= 1e-5


def test_sampler_compiles_by_default_only_off_the_cpu(models):
    config, reference, _ = models
    unet = mlx_from_torch(reference, config)
    Sampler(unet, make_scheduler("euler", SDXL_SCHEDULER_CONFIG))
    assert unet._forward == unet._denoise  # this machine is CPU-only
    Sampler(unet, make_scheduler("euler", SDXL_SCHEDULER_CONFIG), compile=True)
    assert unet._forward != unet._denoise
