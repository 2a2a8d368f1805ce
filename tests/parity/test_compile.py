"""The compiled forward, the low-memory forward, and what the sampler computes once per run."""

import gc
import weakref

import mlx.core as mx
import numpy as np
import pytest
from axes import CODE_PATHS, each_value_once
from reference import make_inputs, mlx_from_torch, relative_error, run_mlx, run_torch, tiny_config, torch_unet

from mlx_unet import Sampler, UNet2DConditionModel, make_scheduler
from mlx_unet.cpu import on_cpu
from mlx_unet.pipelines.run import CompiledForward, RunSettings, compiled_forward
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG

BOUNDS = {"float32": 1e-4, "float16": 1e-2}  # as tests/test_parity.py's, against diffusers in float32


@pytest.fixture(scope="module")
def models():
    config = tiny_config("sdxl-base")
    reference = torch_unet(config, seed=30)
    return config, reference, mlx_from_torch(reference, config)


@pytest.fixture
def traces(monkeypatch):
    """The Python runs of the UNet's forward: with mx.compile, one per trace."""
    runs = []
    original = UNet2DConditionModel.denoise

    def counted(self, *args, **kwargs):
        runs.append([a.shape for a in args if isinstance(a, mx.array)])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "denoise", counted)
    return runs


def test_compiled_forward_matches_diffusers_and_traces_once_per_shape_and_dtype(models, traces):
    config, reference, _ = models
    unet = mlx_from_torch(reference, config)
    forward = compiled_forward(unet)
    inputs = make_inputs(config, 2, 16, 16, seed=31, timesteps=[999.0, 10.0])
    assert relative_error(run_mlx(forward, inputs), run_torch(reference, inputs)) <= 1e-4
    assert len(traces) == 1

    # New timesteps, prompts, time ids and latents of the same shapes: no new trace; nor asking
    # again for the compiled forward (each Sampler, so each image, does).
    assert compiled_forward(unet) is forward
    for seed, t in ((32, [500.0, 1.0]), (33, 250), (34, [3.0, 700.0])):
        again = make_inputs(config, 2, 16, 16, seed=seed, timesteps=t)
        assert relative_error(run_mlx(compiled_forward(unet), again), run_torch(reference, again)) <= 1e-4
    assert len(traces) == 1

    run_mlx(forward, make_inputs(config, 2, 24, 16, seed=35))  # new resolution
    assert len(traces) == 2
    run_mlx(forward, make_inputs(config, 1, 24, 16, seed=36))  # new batch
    assert len(traces) == 3
    unet.set_dtype(mx.float16)  # new dtype
    half = run_mlx(forward, make_inputs(config, 1, 24, 16, seed=36))
    assert len(traces) == 4 and np.isfinite(half).all()


@pytest.mark.parametrize("code_path,dtype", each_value_once(list(CODE_PATHS), ["float32", "float16"]),
                         indirect=["code_path"])
def test_compiled_and_plain_forwards_match_diffusers(code_path, dtype):
    config = tiny_config("sdxl-base")
    reference = torch_unet(config, seed=42)
    unet = mlx_from_torch(reference, config, dtype=getattr(mx, dtype))
    inputs = make_inputs(config, 2, 16, 24, seed=43, timesteps=[980.0, 20.0])
    expected = run_torch(reference, inputs)
    plain, compiled = run_mlx(unet, inputs), run_mlx(compiled_forward(unet), inputs)
    assert relative_error(plain, expected) <= BOUNDS[dtype]
    assert relative_error(compiled, expected) <= BOUNDS[dtype]
    if dtype == "float32":  # (in float16 fused kernels round less often than separate ones)
        assert relative_error(compiled, plain) <= 1e-5


def test_compiled_forward_reads_the_current_weights(models):
    config, reference, _ = models
    unet = mlx_from_torch(reference, config)
    inputs = make_inputs(config, 1, 16, 16, seed=37)
    before = run_mlx(compiled_forward(unet), inputs)
    unet.conv_out.bias = unet.conv_out.bias + 1.0  # same shape: no new trace, new values used
    np.testing.assert_allclose(run_mlx(compiled_forward(unet), inputs), before + 1.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_mlx(unet, inputs), before + 1.0, rtol=1e-5, atol=1e-5)


def test_the_compiled_forward_does_not_keep_its_unet_alive(models):
    config, reference, _ = models
    unet = mlx_from_torch(reference, config)
    run_mlx(compiled_forward(unet), make_inputs(config, 1, 16, 16, seed=44))
    alive = weakref.ref(unet)
    del unet
    gc.collect()
    # A pipeline loads the refiner's UNet after the base one is released: both must not stay.
    assert alive() is None


def _cache_limit() -> int:
    current = mx.set_cache_limit(0)
    mx.set_cache_limit(current)
    return current


def test_low_memory_forward_gives_the_same_output_block_by_block(models, monkeypatch):
    config, reference, ours = models
    inputs = make_inputs(config, 2, 16, 16, seed=38)
    normal = run_mlx(ours, inputs)
    evaluated = []
    monkeypatch.setattr(mx, "eval", lambda *arrays: evaluated.append(len(arrays)) or mx.async_eval(*arrays))
    settings = RunSettings(compile=True, low_memory=True)
    assert not settings.compiles  # low memory overrides compile
    np.testing.assert_array_equal(run_mlx(settings.forward(ours), inputs), normal)
    blocks = len(ours.down_blocks) + 1 + len(ours.up_blocks)
    assert len(evaluated) == blocks


def test_low_memory_limits_the_cache_only_inside_the_run():
    limit = mx.set_cache_limit(3 << 30)
    try:
        with RunSettings(low_memory=True).applied():
            assert _cache_limit() == int(0.25 * 2**30)
        assert _cache_limit() == 3 << 30
        with RunSettings(low_memory=True, cache_limit_gb=1).applied():
            assert _cache_limit() == 1 << 30
        with RunSettings().applied():
            assert _cache_limit() == 3 << 30
    finally:
        mx.set_cache_limit(limit)


def test_added_embedding_can_be_passed_precomputed(models):
    config, reference, ours = models
    inputs = make_inputs(config, 2, 16, 16, seed=39)
    expected = run_torch(reference, inputs)
    added = ours.added_embedding(mx.array(inputs["text_embeds"]), mx.array(inputs["time_ids"]))
    out = ours(mx.array(inputs["sample"]), mx.array(inputs["timestep"]), mx.array(inputs["encoder_hidden_states"]),
               added_embedding=added)
    assert relative_error(np.array(out), expected) <= 1e-4


def _embeddings(config, seed):
    rng = np.random.default_rng(seed)
    prompt = mx.array(rng.normal(size=(1, 7, config.cross_attention_dim)).astype(np.float32))
    pooled = mx.array(rng.normal(size=(1, config.projection_class_embeddings_input_dim - 6 * 8)).astype(np.float32))
    return prompt, pooled


def test_sampler_computes_the_added_embedding_once_per_run(models, monkeypatch):
    config, _, ours = models
    calls = []
    original = UNet2DConditionModel.added_embedding
    monkeypatch.setattr(UNet2DConditionModel, "added_embedding",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    sampler = Sampler(ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG))
    sampler(*_embeddings(config, 40), num_inference_steps=4, height=128, width=128, seed=1)
    assert len(calls) == 1


def test_low_memory_sampler_matches_the_batched_one(models):
    config, _, ours = models
    prompt, pooled = _embeddings(config, 41)
    kwargs = dict(num_inference_steps=3, height=128, width=128, seed=2, guidance_scale=6.0)
    scheduler = SDXL_SCHEDULER_CONFIG
    batched = Sampler(ours, make_scheduler("euler", scheduler))(prompt, pooled, **kwargs)
    one_by_one = Sampler(ours, make_scheduler("euler", scheduler), low_memory=True)(prompt, pooled, **kwargs)
    assert relative_error(np.array(one_by_one), np.array(batched)) <= 1e-5


def test_sampler_compiles_by_default_only_off_the_cpu(models):
    _, _, ours = models
    plain = Sampler(ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG), compile=False).settings
    assert not plain.compiles and plain.forward(ours) is ours
    default = Sampler(ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG)).settings
    assert default.compiles == (not on_cpu())
    compiled = Sampler(ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG), compile=True).settings
    assert compiled.compiles and isinstance(compiled.forward(ours), CompiledForward)
