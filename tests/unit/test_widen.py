"""Half precision on the CPU kernels (``cpu.widen``, ``cpu.half``): a half-precision model keeps
the kernels' weights in half precision, holds the rest in float32 and computes what a float32
copy of its weights computes, bit for bit; ``RunSettings(widen_weights=True)`` holds the whole
UNet in float32 for a run, computes the same, and puts it back bit for bit (by an exception too);
a run widens it by itself where that pays and fits."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_unet import CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig, cpu
from mlx_unet.configs.quantization import Quantization
from mlx_unet.cpu import widen
from mlx_unet.cpu.conv import Conv2d
from mlx_unet.cpu.half import float32
from mlx_unet.cpu.linear import Linear
from mlx_unet.pipelines import memory, run
from mlx_unet.pipelines.model_sizes import largest_linear, unet_bytes, unet_parameters
from mlx_unet.pipelines.sampler import Sampler
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG, make_scheduler


def _rounded(model, dtype):
    """``model`` with its weights rounded to float16, then cast to ``dtype``."""
    model.update(tree_map(lambda a: a.astype(mx.float16).astype(dtype), model.parameters()))
    return model


def _unet(dtype=mx.float16, kernels=True) -> UNet2DConditionModel:
    mx.random.seed(0)
    return cpu.prepare(_rounded(UNet2DConditionModel(UNetConfig.from_preset("tiny")), dtype), kernels)


def _bits(model) -> dict[str, np.ndarray]:
    return {k: np.array(v.view(mx.uint16) if v.dtype in widen.HALF else v) for k, v in tree_flatten(model.parameters())}


def _inputs(unet):
    """A context and pooled embedding whose values are float16's."""
    c = unet.config
    keys = mx.random.split(mx.random.key(1), 3)
    context = mx.random.normal((1, 7, c.cross_attention_dim), key=keys[0]).astype(mx.float16).astype(mx.float32)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return context, mx.random.normal((1, pooled), key=keys[1]).astype(mx.float16).astype(mx.float32)


def _forward(unet):
    sample = mx.random.normal((2, 8, 8, 4), key=mx.random.key(2)).astype(mx.float16).astype(mx.float32)
    context, pooled = _inputs(unet)
    return np.array(unet(sample, mx.array([10, 500]), mx.concatenate([context, context]),
                         text_embeds=mx.concatenate([pooled, pooled]), time_ids=mx.array([[64, 64, 0, 0, 64, 64]] * 2)))


def _run(unet, widen_weights=False):
    context, pooled = _inputs(unet)
    sampler = Sampler(unet, make_scheduler("euler", SDXL_SCHEDULER_CONFIG), compile=False, widen_weights=widen_weights)
    return np.array(sampler(context, pooled, num_inference_steps=2, guidance_scale=5.0, height=64, width=64, seed=3))


@pytest.mark.parametrize("half", [mx.float16, mx.bfloat16])
def test_every_half_value_widens_exactly(half):
    """All 65536 bit patterns: zeros of both signs, subnormals, inf and NaN included."""
    bits = np.arange(2**16, dtype=np.uint16)
    ours = np.array(float32(mx.array(bits).view(half)))
    expected = bits.view(np.float16).astype(np.float32) if half == mx.float16 else \
        (bits.astype(np.uint32) << 16).view(np.float32)
    same = (ours.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(ours) & np.isnan(expected))
    assert ours.dtype == np.float32 and same.all(), bits[~same][:5]
    nans = 2 * (2**10 - 1) if half == mx.float16 else 2 * (2**7 - 1)  # both signs, every nonzero mantissa
    assert np.isnan(expected).sum() == nans and (expected == 0).sum() == 2  # the patterns were there
    rows = mx.array(bits[:1024].reshape(32, 32)).view(half)
    assert mx.array_equal(float32(rows.T), float32(rows).T, equal_nan=True)  # a transposed view too


def test_a_half_unet_on_the_kernels_computes_as_its_float32_copy():
    unet, copy = _unet(), _unet(mx.float32)
    kernels = {f"{path}.weight" for path, layer in unet.named_modules() if isinstance(layer, (Linear, Conv2d))}
    dtypes = {name: value.dtype for name, value in tree_flatten(unet.parameters())}
    assert {name for name, dtype in dtypes.items() if dtype == mx.float16} == kernels
    assert all(dtypes[name] == mx.float32 for name in dtypes.keys() - kernels) and unet.dtype == mx.float32
    assert np.array_equal(_forward(unet), _forward(copy))
    plain = _unet(kernels=False)  # MLX's own layers (Metal's code path): half precision throughout
    assert plain.dtype == mx.float16 and not np.array_equal(_forward(plain), _forward(copy))


def test_a_half_text_encoder_on_the_kernels_computes_as_its_float32_copy():
    """Its embeddings (not a kernel's weights) held in float32 too, so no sum is rounded to half."""
    config = CLIPTextConfig.from_preset("sdxl-clip-bigg", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=2, projection_dim=32, vocab_size=1000)
    mx.random.seed(4)
    half = cpu.prepare(_rounded(CLIPTextModel(config), mx.float16), cpu_kernels=True)
    mx.random.seed(4)
    copy = cpu.prepare(_rounded(CLIPTextModel(config), mx.float32), cpu_kernels=True)
    assert half.dtype == mx.float32 and widen.half_parameters(half)
    ids = mx.array(np.random.default_rng(5).integers(0, 1000, (2, 77)))
    for ours, expected in zip(half(ids), copy(ids)):
        assert np.array_equal(np.array(ours), np.array(expected))


def test_a_unet_widened_for_a_run_computes_the_same_and_comes_back_bit_for_bit():
    unet, copy = _unet(), _unet(mx.float32)
    before, half = _bits(unet), len(widen.half_parameters(unet))
    held = _forward(unet)
    with widen.widened(unet) as count:
        assert count == half > 0 and not widen.half_parameters(unet)
        for _, layer in unet.named_modules():  # the CPU kernels' weights keep their memory layout
            if hasattr(type(layer), "laid_out"):
                assert mx.array_equal(layer.weight, type(layer).laid_out(layer.weight))
        assert np.array_equal(_forward(unet), held)
    after = _bits(unet)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert np.array_equal(_run(unet, widen_weights=True), _run(unet))
    assert np.array_equal(_run(unet), _run(copy))  # the conditioning is made in float32 too


def test_weights_come_back_after_an_exception():
    unet = _unet()
    before = _bits(unet)
    with pytest.raises(KeyboardInterrupt):
        with widen.widened(unet):
            raise KeyboardInterrupt
    after = _bits(unet)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_a_run_widens_where_asked_or_where_it_pays_and_fits(monkeypatch):
    unet, sample = _unet(), (2, 8, 8, 4)
    freed, enough = run.WIDEN_FROM_FORWARDS, run.WIDEN_FROM_FORWARDS + run.NARROW_BACK_FORWARDS
    monkeypatch.delenv(memory.BUDGET_ENV, raising=False)
    assert not run.RunSettings().widens(unet, enough - 1, sample)  # too short a run to pay
    assert run.RunSettings().widens(unet, enough, sample)
    # A run that need not narrow the weights back (its UNet is freed next) pays from fewer forwards.
    assert not run.RunSettings(narrow_back=False).widens(unet, freed - 1, sample)
    assert run.RunSettings(narrow_back=False).widens(unet, freed, sample)
    assert not run.RunSettings(low_memory=True).widens(unet, enough, sample)
    assert not run.RunSettings(widen_weights=False).widens(unet, enough, sample)
    assert run.RunSettings(widen_weights=True).widens(unet)
    assert run.RunSettings(low_memory=True, widen_weights=True).widens(unet)
    assert not run.RunSettings(widen_weights=True).widens(_unet(mx.float32))  # nothing is half
    assert not run.RunSettings(widen_weights=True).widens(_unet(kernels=False))  # MLX's own layers: no widening
    # Where the float32 copies would not fit, a run that was not asked does not widen.
    needed = (mx.get_active_memory() + widen.widening_bytes(unet) + memory.STAGE_ALLOWANCE
              + memory.unet_activations(unet.config, sample[1:3], sample[0], mx.float32, True))
    for budget, widens in ((needed - widen.widening_bytes(unet) // 2, False), (needed + 2**20, True)):
        monkeypatch.setenv(memory.BUDGET_ENV, repr(budget / 2**30))
        assert run.RunSettings().widens(unet, enough, sample) == widens
        assert run.RunSettings(widen_weights=True).widens(unet, enough, sample)


def test_a_long_enough_run_widens_by_itself_and_narrows_back_unless_told_not_to(monkeypatch):
    """Widened in every step of the run, the same latents, and the UNet back bit for bit after it;
    with ``narrow_back=False`` left in float32, for a caller that frees it next."""
    monkeypatch.setattr(run, "WIDEN_FROM_FORWARDS", 2)
    monkeypatch.setattr(run, "NARROW_BACK_FORWARDS", 0)
    unet = _unet()
    before, expected = _bits(unet), _run(unet, widen_weights=False)
    context, pooled = _inputs(unet)

    def run_steps(**settings):
        sampler = Sampler(unet, make_scheduler("euler", SDXL_SCHEDULER_CONFIG), compile=False, **settings)
        half, latents = [], None
        for step in sampler.steps(context, pooled, num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                                  seed=3):
            half.append(len(widen.half_parameters(unet)))
            latents = np.array(step.latents)
        return half, latents

    half, latents = run_steps()
    after = _bits(unet)
    assert half == [0, 0] and np.array_equal(latents, expected)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    half, latents = run_steps(narrow_back=False)
    assert half == [0, 0] and np.array_equal(latents, expected)
    assert not widen.half_parameters(unet) and unet.dtype == mx.float32


def test_the_memory_estimate_counts_half_weights_and_their_float32_copies(monkeypatch):
    """SDXL's UNet in float16 on the kernels: 2 bytes a parameter less than float32, less the
    transient float32 copies of its widened weights; held in float32 for a run, what a float32
    UNet takes (its weights are used as they are, so no copies), but a quantized UNet keeps its
    copies (its quantized layers are dequantized at each call, widened or not); the same whatever
    the budget."""
    unet, vae = UNetConfig.from_preset("sdxl-base"), VAEConfig.from_preset("sdxl")

    def denoise(budget_gb: int, **change) -> int:
        monkeypatch.setenv(memory.BUDGET_ENV, str(budget_gb))
        settings = dict(height=1024, width=1024, images=1, guided=True, dtype=mx.float16, vae_dtype=mx.float32,
                        tiled_vae=False, low_memory=False, cpu_kernels=True) | change
        return memory.estimate_run(unet, vae, [], **settings).stages["denoise"]

    copies = memory.FLOAT32_WEIGHT_COPIES * 4 * largest_linear(unet)
    assert denoise(64, dtype=mx.float32) - denoise(64) == 2 * unet_parameters(unet) - copies
    # Held in float32 for the run, as a float32 UNet is, and so without the per-call float32 copies.
    assert denoise(64, widen_weights=True) == denoise(64, dtype=mx.float32)
    q4 = Quantization.make(4)
    held = unet_bytes(unet, 4, q4) - unet_bytes(unet, 2, q4)
    assert 0 < held < 2 * unet_parameters(unet)  # the layers left dense, and quantized ones' scales
    assert denoise(64, widen_weights=True, unet_quantization=q4) - denoise(64, unet_quantization=q4) == held
    assert denoise(64) == denoise(12)


def test_a_loaded_half_unet_holds_as_a_prepared_one(tmp_path):
    """``from_pretrained(dtype=float16)`` on the kernels: the kernels' weights in half precision,
    the rest in float32, the values those of the half-precision weights."""
    from mlx_unet.demo import write_demo_pipeline

    folder = write_demo_pipeline(tmp_path / "demo") / "unet"
    held = dict(tree_flatten(UNet2DConditionModel.from_pretrained(folder, dtype=mx.float16).parameters()))
    plain = dict(tree_flatten(UNet2DConditionModel.from_pretrained(folder, dtype=mx.float16,
                                                                   cpu_kernels=False).parameters()))
    prepared = dict(tree_flatten(cpu.prepare(UNet2DConditionModel.from_pretrained(
        folder, dtype=mx.float16, cpu_kernels=False)).parameters()))
    assert held.keys() == plain.keys() == prepared.keys()
    for name, value in held.items():
        assert value.dtype == prepared[name].dtype and plain[name].dtype == mx.float16
        assert np.array_equal(np.array(value.astype(mx.float32)), np.array(plain[name].astype(mx.float32)))
