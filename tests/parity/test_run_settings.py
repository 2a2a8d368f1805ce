"""A Sampler's run settings (compiling, low memory) are settings of its runs: the UNet it is
given is left as it was, and so is the process's MLX cache limit, after a run and after a run
that fails."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from reference import mlx_from_torch, relative_error, tiny_config, torch_unet

from mlx_unet import Sampler, UNet2DConditionModel, make_scheduler
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG

LOW_MEMORY_LIMIT = int(0.25 * 2**30)
SETTINGS = {"default": {}, "compiled": {"compile": True}, "low-memory": {"low_memory": True}}


@pytest.fixture(scope="module")
def made():
    config = tiny_config("sdxl-base")
    return config, torch_unet(config, seed=50)


@pytest.fixture
def unet(made):
    config, reference = made
    return mlx_from_torch(reference, config)


@pytest.fixture
def cache_limit():
    """A known limit before the test, the previous one restored after it."""
    previous = mx.set_cache_limit(3 << 30)
    yield 3 << 30
    mx.set_cache_limit(previous)


def _current_cache_limit() -> int:
    current = mx.set_cache_limit(0)
    mx.set_cache_limit(current)
    return current


def _embeddings(config, seed=51):
    rng = np.random.default_rng(seed)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return (mx.array(rng.standard_normal((1, 7, config.cross_attention_dim), dtype=np.float32)),
            mx.array(rng.standard_normal((1, pooled), dtype=np.float32)))


RUN = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, seed=4)


def _sampler(unet, **settings):
    return Sampler(unet, make_scheduler("euler_a", SDXL_SCHEDULER_CONFIG), **settings)


def _state(unet) -> tuple[dict, dict]:
    """The UNet's modules and their attributes by name, to compare by identity, and the modules'
    other entries (arrays, sizes), by value: tracing a compiled forward hands the same arrays and
    tuples back in new Python objects."""
    objects, values = {}, {}
    for name, module in unet.named_modules():
        objects[name] = module
        objects.update({f"{name}:{k}": v for k, v in vars(module).items()})
        values.update({f"{name}.{k}": np.array(v) if isinstance(v, mx.array) else v
                       for k, v in module.items() if not isinstance(v, (nn.Module, list))})
    return objects, values


def _unchanged(before: tuple[dict, dict], after: tuple[dict, dict]) -> bool:
    (objects, values), (objects_after, values_after) = before, after
    return (objects.keys() == objects_after.keys() and all(objects[k] is objects_after[k] for k in objects)
            and values.keys() == values_after.keys()
            and all(np.array_equal(values[k], values_after[k]) for k in values))


@pytest.mark.parametrize("settings", list(SETTINGS))
def test_a_sampler_leaves_the_unet_as_it_found_it(made, unet, settings, cache_limit):
    config, _ = made
    before = _state(unet)
    sampler = _sampler(unet, **SETTINGS[settings])
    sampler(*_embeddings(config), **RUN)
    sampler(*_embeddings(config), **RUN)
    assert _unchanged(before, _state(unet))
    assert _current_cache_limit() == cache_limit


def test_low_memory_limits_the_cache_during_the_run_only(made, unet, cache_limit):
    config, _ = made
    seen = [_current_cache_limit() for _ in _sampler(unet, low_memory=True).steps(*_embeddings(config), **RUN)]
    assert seen == [LOW_MEMORY_LIMIT] * RUN["num_inference_steps"]
    assert _current_cache_limit() == cache_limit

    steps = _sampler(unet, low_memory=True).steps(*_embeddings(config), **RUN)
    next(steps)
    steps.close()  # a run stopped part way (a pipeline closes it when its callback raises)
    assert _current_cache_limit() == cache_limit


def test_the_cache_limit_is_restored_after_a_run_that_raises(made, unet, cache_limit, monkeypatch):
    config, _ = made
    calls = []
    denoise = UNet2DConditionModel.denoise

    def fails_on_the_second_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return denoise(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "denoise", fails_on_the_second_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        _sampler(unet, low_memory=True)(*_embeddings(config), **{**RUN, "guidance_scale": 1.0})
    assert _current_cache_limit() == cache_limit


def test_compiled_and_uncompiled_sampling_give_the_same_latents(made, unet):
    config, _ = made
    plain = _sampler(unet, compile=False)(*_embeddings(config), **RUN)
    compiled = _sampler(unet, compile=True)(*_embeddings(config), **RUN)
    assert relative_error(np.array(compiled), np.array(plain)) <= 1e-5


def test_a_second_sampler_on_the_same_unet_reuses_the_compiled_forward(made, unet, monkeypatch):
    config, reference = made
    traces = []
    denoise = UNet2DConditionModel.denoise
    monkeypatch.setattr(UNet2DConditionModel, "denoise",
                        lambda self, *a, **k: traces.append(1) or denoise(self, *a, **k))
    first = _sampler(unet, compile=True)(*_embeddings(config), **RUN)
    second = _sampler(unet, compile=True)(*_embeddings(config), **RUN)
    assert len(traces) == 1  # one trace for the six steps of both runs
    assert mx.array_equal(first, second)
    _sampler(mlx_from_torch(reference, config), compile=True)(*_embeddings(config), **RUN)
    assert len(traces) == 2  # another UNet: its own compiled forward
