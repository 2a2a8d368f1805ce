"""Our AutoencoderKL against diffusers' on the same seeded weights and inputs: decode, encode,
fp16, tiled decode, SDXL's real widths; the config parser, input checks and weight loading."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from axes import CODE_PATHS, each_value_once
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from mlx.utils import tree_flatten
from reference import relative_error
from reference_vae import mlx_vae_from_torch, to_numpy, torch_decode, torch_encode, torch_vae

from mlx_unet import ConfigError, InputError, WeightsError
from mlx_unet import AutoencoderKL, UNetConfig, VAEConfig, cpu
from mlx_unet.pipelines import memory
from mlx_unet.models.vae import DiagonalGaussian

FP32_BOUND = 1e-4
# A float16 (bfloat16) decode is judged against diffusers' float32 decode, relative to diffusers' own
# decode of the same weights in that dtype (about 3e-3 of the output scale at tiny width; ours measured 2e-3,
# as it keeps GroupNorm statistics, attention and Linear products in float32): no worse than 2x.
HALF_VS_DIFFUSERS_HALF = 2.0

# A variant that drops everything optional: the mid-block attention and both 1x1 convolutions.
_BARE = {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
         "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "mid_block_add_attention": False,
         "use_quant_conv": False, "use_post_quant_conv": False}


def _normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module", params=["tiny", "bare"])
def tiny_reference(request):
    config = VAEConfig.from_preset("tiny", **(_BARE if request.param == "bare" else {}))
    return config, torch_vae(config, seed=1)


@pytest.fixture
def tiny(tiny_reference, code_path):
    """Ours built in the test, on the test's code path (the CPU kernels or plain MLX)."""
    config, reference = tiny_reference
    return config, reference, mlx_vae_from_torch(reference, config)


def test_decode_fp32(tiny):
    config, reference, ours = tiny
    latents = _normal((2, 8, 12, config.latent_channels), seed=2)
    out = to_numpy(ours.decode(mx.array(latents)))
    f = config.downsample_factor
    assert out.shape == (2, 8 * f, 12 * f, config.out_channels)
    error = relative_error(out, torch_decode(reference, latents))
    print(f"decode fp32 {config.block_out_channels}: {error:.2e}")
    assert error <= FP32_BOUND


def test_encode_fp32(tiny):
    """61x67 is not a multiple of the downsampling: the stride-2 convolutions pad bottom/right."""
    config, reference, ours = tiny
    for height, width in ((64, 72), (61, 67)):
        images = _images((2, height, width, config.in_channels), seed=3)
        posterior = ours.encode(mx.array(images))
        mean, logvar = torch_encode(reference, images)
        errors = relative_error(to_numpy(posterior.mean), mean), relative_error(to_numpy(posterior.logvar), logvar)
        print(f"encode fp32 {config.block_out_channels} {height}x{width}: mean {errors[0]:.2e}, logvar {errors[1]:.2e}")
        assert max(errors) <= FP32_BOUND


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decode_half_precision(dtype):
    """Against diffusers' float32 decode, no worse than 2x diffusers' own decode in that dtype."""
    config = VAEConfig.from_preset("tiny")
    reference = torch_vae(config, seed=4)
    reference_half = torch_vae(config, seed=4, dtype=getattr(torch, dtype))
    ours_half = mlx_vae_from_torch(reference, config, dtype=getattr(mx, dtype))
    latents = _normal((1, 8, 8, config.latent_channels), seed=5)
    out = ours_half.decode(mx.array(latents))
    assert out.dtype == cpu.computes_in(getattr(mx, dtype))
    exact = torch_decode(reference, latents)
    ours_error = relative_error(to_numpy(out), exact)
    theirs_error = relative_error(torch_decode(reference_half, latents), exact)
    print(f"decode {dtype} vs diffusers fp32: ours {ours_error:.2e}, diffusers {dtype} {theirs_error:.2e}")
    assert np.isfinite(to_numpy(out)).all()
    assert ours_error <= HALF_VS_DIFFUSERS_HALF * theirs_error


def _diffusers_tiles(reference, tile, overlap, factor):
    reference.enable_tiling()
    reference.tile_sample_min_size = tile
    reference.tile_latent_min_size = tile // factor
    reference.tile_overlap_factor = overlap


TILINGS = [(32, 0.25, (1, 7, 10)), (64, 0.5, (2, 11, 9))]  # tile, overlap, latent shape


@pytest.mark.parametrize("code_path,tiling", each_value_once(list(CODE_PATHS), TILINGS), indirect=["code_path"])
def test_tiled_decode_matches_diffusers(code_path, tiling):
    """Small tiles so that there are several in both directions, and edge tiles as narrow as
    (32 px) or narrower than (64 px) the blend; diffusers tiles with the same sizes."""
    tile, overlap, shape = tiling
    config = VAEConfig.from_preset("tiny")
    reference = torch_vae(config, seed=6)
    ours = mlx_vae_from_torch(reference, config)
    _diffusers_tiles(reference, tile, overlap, config.downsample_factor)
    ours.enable_tiling(tile, overlap)
    latents = mx.array(_normal((*shape, config.latent_channels), seed=7))
    out = to_numpy(ours.decode(latents))
    assert out.shape == (shape[0], 8 * shape[1], 8 * shape[2], 3)
    error = relative_error(out, torch_decode(reference, np.array(latents)))
    untiled = relative_error(out, to_numpy(ours._decode(latents)))
    print(f"tiled decode {tile}px overlap {overlap}: {error:.2e} (untiled differs by {untiled:.2e})")
    assert error <= FP32_BOUND
    assert untiled > 100 * FP32_BOUND  # the tiles really were decoded apart
    np.testing.assert_array_equal(to_numpy(ours.tiled_decode(latents)), out)
    one_tile = latents[:, :tile // 8, :tile // 8]  # no larger than a tile: decoded whole
    np.testing.assert_array_equal(to_numpy(ours.decode(one_tile)), to_numpy(ours._decode(one_tile)))


@pytest.mark.usefixtures("code_path")
def test_decode_tiles_by_need_within_its_memory_budget():
    """By default a decode is tiled only when its estimated memory exceeds the budget, in the
    largest tile (of sample_size and its halves) that fits: here 32 px, which equals diffusers'
    tiled_decode with 32 px tiles. With room for the whole decode it is diffusers' plain decode."""
    config = VAEConfig.from_preset("tiny")
    reference = torch_vae(config, seed=15)
    ours = mlx_vae_from_torch(reference, config)
    latents = _normal((1, 11, 9, config.latent_channels), seed=16)
    f = config.downsample_factor
    pixels, chunked = (11 * f, 9 * f), cpu.is_accelerated(ours.decoder.conv_in)

    def need(tile):  # the estimate the decode compares with its budget
        return memory.decode_bytes(config, pixels, tile, 1, mx.float32, chunked)

    assert ours.use_tiling is None and ours.memory_budget is None
    assert ours.decode_tile_size(latents.shape) is None  # the machine's memory: room for it whole
    ours.enable_tiling_by_need(memory_budget=need(32))
    assert ours.decode_tile_size(latents.shape) == 32
    tiled = to_numpy(ours.decode(mx.array(latents)))
    untiled = torch_decode(reference, latents)
    _diffusers_tiles(reference, 32, 0.25, f)
    error = relative_error(tiled, torch_decode(reference, latents))
    print(f"decode tiled by need (32 px tiles): {error:.2e}")
    assert error <= FP32_BOUND and relative_error(tiled, untiled) > 100 * FP32_BOUND

    ours.enable_tiling_by_need(memory_budget=need(None))
    assert ours.decode_tile_size(latents.shape) is None
    assert relative_error(to_numpy(ours.decode(mx.array(latents))), untiled) <= FP32_BOUND
    ours.memory_budget = 1  # nothing fits: the smallest tile
    assert ours.decode_tile_size(latents.shape) == 32
    ours.disable_tiling()
    assert ours.decode_tile_size(latents.shape) is None
    ours.enable_tiling(64)
    assert ours.decode_tile_size(latents.shape) == 64
    with pytest.raises(InputError, match="memory_budget"):
        ours.enable_tiling_by_need(memory_budget=0)


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "plain-mlx"])
def test_run_estimate_tiles_the_decode_as_the_vae_does(kernels):
    """The run's memory estimate (tiled_vae None: by need) picks the tile the VAE's decode picks
    with the same budget: its decode stage is that of the explicitly tiled decode."""
    unet, vae = UNetConfig.from_preset("sdxl-base"), VAEConfig.from_preset("sdxl")
    run = dict(images=1, guided=True, dtype=mx.float16, vae_dtype=mx.float32, low_memory=False, cpu_kernels=kernels)
    model = AutoencoderKL(vae)
    if kernels:
        model = cpu.accelerate(model, loaded=False)
    for size, budget in ((1024, 64 * memory.GIB), (2048, 6 * memory.GIB), (4096, 3 * memory.GIB)):
        model.enable_tiling_by_need(memory_budget=budget)
        tile = model.decode_tile_size((1, size // 8, size // 8, 4))
        by_need = memory.estimate_run(unet, vae, [], height=size, width=size, tiled_vae=None,
                                      vae_memory_budget=budget, **run)
        explicit = memory.estimate_run(unet, vae, [], height=size, width=size, tiled_vae=tile is not None,
                                       vae_tile=tile, **run)
        assert by_need.stages["decode"] == explicit.stages["decode"], (size, tile)
        print(f"{size} px within {budget / memory.GIB:g} GiB: tiles of {tile}")


def test_sdxl_widths_decode_and_encode():
    """The real SDXL VAE config (128-512 channels, 32 groups, 512-wide one-head attention) at a
    64x64 image / 8x8 latent."""
    config = VAEConfig.from_preset("sdxl")
    reference = torch_vae(config, seed=9)
    ours = mlx_vae_from_torch(reference, config)
    latents = _normal((1, 8, 8, 4), seed=10)
    decode_error = relative_error(to_numpy(ours.decode(mx.array(latents))), torch_decode(reference, latents))
    images = _images((1, 64, 64, 3), seed=11)
    posterior = ours.encode(mx.array(images))
    mean, logvar = torch_encode(reference, images)
    mean_error = relative_error(to_numpy(posterior.mean), mean)
    logvar_error = relative_error(to_numpy(posterior.logvar), logvar)
    print(f"SDXL widths fp32: decode {decode_error:.2e}, encode mean {mean_error:.2e}, logvar {logvar_error:.2e}")
    assert max(decode_error, mean_error, logvar_error) <= FP32_BOUND


# ---------------------------------------------------------------------- the latent distribution


def test_diagonal_gaussian_matches_diffusers():
    """Moments far outside the clamp range, so the clamp itself is compared."""
    moments = _normal((2, 5, 6, 8), seed=12) * 40
    theirs = DiagonalGaussianDistribution(torch.from_numpy(moments).permute(0, 3, 1, 2))
    ours = DiagonalGaussian(mx.array(moments))
    for name in ("mean", "logvar", "std"):
        expected = getattr(theirs, name).permute(0, 2, 3, 1).numpy()
        assert relative_error(to_numpy(getattr(ours, name)), expected) <= 1e-6, name
    assert (to_numpy(ours.logvar) == 20).any() and (to_numpy(ours.logvar) == -30).any()
    np.testing.assert_array_equal(to_numpy(ours.mode()), moments[..., :4])
    # sample: mean + std * noise drawn from the key
    key = mx.random.key(3)
    noise = mx.random.normal(ours.mean.shape, key=key)
    np.testing.assert_allclose(to_numpy(ours.sample(key)), to_numpy(ours.mean + ours.std * noise), rtol=1e-6)
    assert not np.array_equal(to_numpy(ours.sample(key)), to_numpy(ours.sample(mx.random.key(4))))


# ---------------------------------------------------------------------- config


def test_config_round_trips_through_diffusers_dict():
    for name in ("sdxl", "tiny"):
        config = VAEConfig.from_preset(name)
        assert VAEConfig.from_dict(config.to_diffusers_dict()) == config


_BAD_CONFIGS = [
    ({"down_block_types": ["AttnDownEncoderBlock2D"] * 4}, "'AttnDownEncoderBlock2D'"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "one block type per entry"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"norm_num_groups": 12}, "does not split"),
    ({"scaling_factor": 0}, "scaling_factor"),
    ({"force_upcast": "yes"}, "force_upcast"),
    ({"layers_per_block": 0}, "layers_per_block"),
    ({"sample_size": [64, 96]}, "sample_size"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
]


def test_bad_config(tmp_path):
    # One test item for all cases: each item costs a gc pass in conftest's teardown.
    for change, message in _BAD_CONFIGS:
        with pytest.raises(ConfigError, match=message):
            VAEConfig.from_dict({**VAEConfig.from_preset("sdxl").to_diffusers_dict(), **change})
    with pytest.raises(ConfigError, match="unknown VAE preset"):
        VAEConfig.from_preset("sd42")
    with pytest.raises(ConfigError, match="no VAE config"):
        AutoencoderKL.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def bare():
    """Default-initialised: for checks that never compare numbers."""
    return AutoencoderKL(VAEConfig.from_preset("tiny", **_BARE))


_BAD_INPUTS = [
    ("decode", mx.zeros((1, 4, 8, 8)), r"NCHW, transpose it with latents.transpose\(0, 2, 3, 1\)"),
    ("decode", mx.zeros((1, 8, 8, 3)), "3 channels in its last axis but this VAE takes 4"),
    ("decode", mx.zeros((8, 8, 4)), r"\(batch, height, width, 4\) NHWC"),
    ("decode", np.zeros((1, 8, 8, 4), np.float32), "must be an mlx array"),
    ("tiled_decode", mx.zeros((1, 4, 8, 8)), "NCHW"),
    ("encode", mx.zeros((1, 3, 64, 64)), r"images.transpose\(0, 2, 3, 1\)"),
    ("encode", mx.zeros((1, 64, 64, 4)), "takes 3"),
    ("encode", mx.zeros((1, 64, 64, 3), mx.uint8), "images / 127.5 - 1"),
    ("encode", mx.zeros((1, 1, 64, 3)), "at least 2x2 pixels"),
]

_BAD_TILING = [
    (61, 0.25, "multiple of 2"),
    (0, 0.25, "positive multiple"),
    (64, 1.0, r"\[0, 1\)"),
    (20, 0.25, "do not stitch evenly"),
]


def test_bad_inputs_and_tiling(bare):
    for call, x, message in _BAD_INPUTS:
        with pytest.raises(InputError, match=message):
            getattr(bare, call)(x)
    for tile, overlap, message in _BAD_TILING:
        with pytest.raises(InputError, match=message):
            bare.enable_tiling(tile, overlap)
        assert not bare.use_tiling and bare.tile_sample_size == bare.config.sample_size


# ---------------------------------------------------------------------- loading


def _write_folder(folder, config: VAEConfig, model: AutoencoderKL, dtype=None):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_diffusers_dict()))
    weights = {k: v if dtype is None else v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), weights)
    return folder


def test_weights_round_trip(tmp_path, tiny):
    config, _, ours = tiny
    loaded = AutoencoderKL.from_pretrained(_write_folder(tmp_path / "vae", config, ours))
    latents = mx.array(_normal((1, 4, 4, 4), seed=14))
    np.testing.assert_array_equal(to_numpy(loaded.decode(latents)), to_numpy(ours.decode(latents)))


def test_from_pretrained_dtype(tmp_path, bare):
    for force_upcast, dtype, expected in (
        (True, None, mx.float32),  # SDXL's VAE: float16 weights are run in float32
        (False, None, mx.float16),  # the fp16-fix VAE: as stored
        (True, mx.bfloat16, mx.bfloat16),  # an explicit dtype wins
    ):
        config = VAEConfig.from_preset("tiny", **_BARE, force_upcast=force_upcast)
        folder = _write_folder(tmp_path / f"vae-{force_upcast}-{dtype}", config, bare, mx.float16)
        loaded = AutoencoderKL.from_pretrained(folder, dtype)
        # The CPU kernels keep a half-precision model's weights half and the rest float32.
        assert {v.dtype for _, v in tree_flatten(loaded.parameters())} == {expected, cpu.computes_in(expected)}
        assert loaded.decode(mx.zeros((1, 2, 2, 4))).dtype == cpu.computes_in(expected)


def test_weights_of_another_config_are_refused(tmp_path, bare):
    folder = _write_folder(tmp_path / "vae", VAEConfig.from_preset("tiny"), bare)
    with pytest.raises(WeightsError, match="missing"):
        AutoencoderKL.from_pretrained(folder)
