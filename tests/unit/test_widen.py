"""A half-precision UNet held in float32 for a run on the CPU kernels (``cpu.widen``,
``RunSettings``): it computes what a float32 copy of its weights computes, comes back bit for bit
after the run (by an exception too), and is widened only where it fits in memory, never in
low-memory mode, on MLX's own layers, or where nothing is half."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_unet import UNet2DConditionModel, UNetConfig, VAEConfig, cpu
from mlx_unet.cpu import widen
from mlx_unet.pipelines import memory, run
from mlx_unet.pipelines.model_sizes import unet_parameters
from mlx_unet.pipelines.sampler import Sampler
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG, make_scheduler


def _unet(dtype=mx.float16, kernels=True) -> UNet2DConditionModel:
    """The tiny UNet, its weights rounded to float16 (then cast to ``dtype``)."""
    mx.random.seed(0)
    unet = UNet2DConditionModel(UNetConfig.from_preset("tiny"))
    unet.update(tree_map(lambda a: a.astype(mx.float16).astype(dtype), unet.parameters()))
    return cpu.prepare(unet, kernels)


def _bits(model) -> dict[str, np.ndarray]:
    return {k: np.array(v.view(mx.uint16) if v.dtype in widen.HALF else v) for k, v in tree_flatten(model.parameters())}


def _inputs(unet):
    """A context and pooled embedding whose values are float16's, so that a half-precision
    run's rounding of them changes nothing."""
    c = unet.config
    keys = mx.random.split(mx.random.key(1), 3)
    context = mx.random.normal((1, 7, c.cross_attention_dim), key=keys[0]).astype(mx.float16).astype(mx.float32)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return context, mx.random.normal((1, pooled), key=keys[1]).astype(mx.float16).astype(mx.float32)


def _run(unet, widen_weights):
    context, pooled = _inputs(unet)
    sampler = Sampler(unet, make_scheduler("euler", SDXL_SCHEDULER_CONFIG), compile=False, widen_weights=widen_weights)
    return np.array(sampler(context, pooled, num_inference_steps=2, guidance_scale=5.0, height=64, width=64, seed=3))


def test_widened_unet_computes_as_float32_and_comes_back_bit_for_bit():
    unet, copy = _unet(), _unet(mx.float32)
    before = _bits(unet)
    assert widen.widening_bytes(unet) == sum(2 * v.size for _, v in tree_flatten(unet.parameters()))
    sample = mx.random.normal((2, 8, 8, 4), key=mx.random.key(2)).astype(mx.float16)
    context, pooled = _inputs(unet)
    args = (sample, mx.array([10, 500]), mx.concatenate([context, context]))
    extra = dict(text_embeds=mx.concatenate([pooled, pooled]), time_ids=mx.array([[64, 64, 0, 0, 64, 64]] * 2))
    half = np.array(unet(*args, **extra))
    with widen.widened(unet) as count:
        assert count == len(before) and unet.dtype == mx.float32 and not widen.half_parameters(unet)
        for _, layer in unet.named_modules():  # the CPU kernels' weights keep their memory layout
            if hasattr(type(layer), "laid_out"):
                assert mx.array_equal(layer.weight, type(layer).laid_out(layer.weight))
        widened_output = np.array(unet(*args, **extra))
    assert np.array_equal(widened_output, np.array(copy(*args, **extra)))
    assert not np.array_equal(widened_output, half.astype(np.float32))  # it did compute in float32
    after = _bits(unet)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert unet.dtype == mx.float16 and np.array_equal(np.array(unet(*args, **extra)), half)


def test_weights_come_back_after_an_exception():
    unet = _unet()
    before = _bits(unet)
    with pytest.raises(KeyboardInterrupt):
        with widen.widened(unet):
            raise KeyboardInterrupt
    after = _bits(unet)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_a_run_widens_where_it_fits_and_computes_in_float32(monkeypatch):
    unet = _unet()
    counts = []
    monkeypatch.setattr(run, "widened", lambda model, narrow_back: _recorded(model, narrow_back, counts))
    by_need = _run(unet, None)
    assert counts == [len(widen.half_parameters(unet))]  # a tiny UNet fits
    half = _run(unet, False)
    assert counts == [counts[0]] and np.array_equal(_run(unet, True), by_need) and len(counts) == 2
    # Against a float32 copy of the same weights: the conditioning's added embedding is made in
    # the UNet's half precision before the run, so not bit for bit, but far closer than half.
    reference = _run(_unet(mx.float32), False)
    scale = np.abs(reference).max()
    widened_error, half_error = np.abs(by_need - reference).max() / scale, np.abs(half - reference).max() / scale
    print(f"widened {widened_error:.1e}, half precision {half_error:.1e}")
    assert widened_error <= 1e-3 and widened_error < half_error / 4


def _recorded(model, narrow_back, counts):
    context = widen.widened(model, narrow_back)

    class Recording:
        def __enter__(self):
            counts.append(context.__enter__())
            return counts[-1]

        def __exit__(self, *exc):
            return context.__exit__(*exc)

    return Recording()


def test_widening_only_where_it_fits_and_is_asked(monkeypatch):
    unet = _unet()
    assert run.RunSettings().widens(unet)
    assert not run.RunSettings(low_memory=True).widens(unet)
    assert run.RunSettings(low_memory=True, widen_weights=True).widens(unet)
    assert not run.RunSettings(widen_weights=False).widens(unet)
    assert not run.RunSettings(widen_weights=True).widens(_unet(mx.float32))  # nothing is half
    assert not run.RunSettings(widen_weights=True).widens(_unet(kernels=False))  # MLX's own layers: no widening
    quantized = _unet()
    nn.quantize(quantized, group_size=32, bits=8,
                class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0)
    assert widen.widening_bytes(quantized) > 0  # its convolutions, norms and the scales outside are half
    assert not run.RunSettings().widens(quantized)  # as the memory estimate: never a quantized UNet by need
    assert run.RunSettings(widen_weights=True).widens(quantized)
    monkeypatch.setenv(memory.BUDGET_ENV, str(widen.widening_bytes(unet) / 2**30))  # less than twice the extra
    assert not run.RunSettings().widens(unet) and run.RunSettings(widen_weights=True).widens(unet)


def test_the_memory_estimate_counts_the_widening(monkeypatch):
    """SDXL's 2.6 G parameters widen by 4.8 GiB: counted at a 64 GiB budget, not at 12 GiB
    (about 5 GiB held, so the widening would not leave half of the rest free)."""
    unet, vae = UNetConfig.from_preset("sdxl-base"), VAEConfig.from_preset("sdxl")

    def denoise(budget_gb: int, **change) -> int:
        monkeypatch.setenv(memory.BUDGET_ENV, str(budget_gb))
        settings = dict(height=1024, width=1024, images=1, guided=True, dtype=mx.float16, vae_dtype=mx.float32,
                        tiled_vae=False, low_memory=False, cpu_kernels=True) | change
        return memory.estimate_run(unet, vae, [], **settings).stages["denoise"]

    assert denoise(64) - denoise(12) == 2 * unet_parameters(unet)
    for unchanged in (dict(low_memory=True), dict(dtype=mx.float32), dict(cpu_kernels=False)):
        assert denoise(64, **unchanged) == denoise(12, **unchanged), unchanged


def test_left_in_float32_where_the_caller_drops_the_model_after():
    unet = _unet()
    with widen.widened(unet, narrow_back=False) as count:
        assert count > 0
    assert unet.dtype == mx.float32 and not widen.half_parameters(unet)


def test_loaded_held_in_float32_is_the_half_precision_model_widened(tmp_path):
    """``from_pretrained(dtype=float16, held_in=float32)``: each weight rounded to float16 and held
    in float32, laid out for the CPU kernels as a widened UNet's are; refused for quantized loads."""
    from mlx_unet.demo import write_demo_pipeline
    from mlx_unet.errors import WeightsError

    folder = write_demo_pipeline(tmp_path / "demo") / "unet"
    half = UNet2DConditionModel.from_pretrained(folder, dtype=mx.float16)
    held = UNet2DConditionModel.from_pretrained(folder, dtype=mx.float16, held_in=mx.float32)
    assert held.dtype == mx.float32 and not widen.half_parameters(held)
    with widen.widened(half):
        expected = dict(tree_flatten(half.parameters()))
        for name, value in tree_flatten(held.parameters()):
            assert value.dtype == expected[name].dtype and np.array_equal(np.array(value), np.array(expected[name]))
        layouts = {n: np.array(v, copy=False).strides for n, v in tree_flatten(half.parameters())}
    assert {n: np.array(v, copy=False).strides for n, v in tree_flatten(held.parameters())} == layouts
    with pytest.raises(WeightsError, match="held_in is for dense weights"):
        UNet2DConditionModel.from_pretrained(folder, dtype=mx.float16, held_in=mx.float32, quantize=8)
