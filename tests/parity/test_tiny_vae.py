"""Our AutoencoderTiny (TAESD, TAESDXL) against diffusers' on the same seeded weights and inputs:
decode and encode on both code paths, half precision, TAESD's real widths; the config parser,
input checks, and conversion of a diffusers folder and of a Hub snapshot."""

import json

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import relative_error, tiny_config
from reference_vae import torch_decode
from reference_tiny_vae import hub_snapshot, mlx_tiny_vae_from_torch, torch_tiny_encode, \
    torch_tiny_vae

from mlx_unet import AutoencoderTiny, ConfigError, InputError, TinyVAEConfig, cpu
from mlx_unet.convert import convert
from mlx_unet.errors import ConversionError

FP32_BOUND = 1e-4
# A float16 (bfloat16) run against diffusers' float32 one, relative to diffusers' own run in that
# dtype: no worse than 2x (as for AutoencoderKL in test_vae.py).
HALF_VS_DIFFUSERS_HALF = 2.0


def _normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def reference():
    config = TinyVAEConfig.from_preset("tiny")
    return config, torch_tiny_vae(config, seed=1)


@pytest.fixture
def tiny(reference, code_path):
    """Ours built in the test, on the test's code path (the CPU kernels or plain MLX)."""
    config, model = reference
    return config, model, mlx_tiny_vae_from_torch(model, config)


def test_decode_fp32(tiny):
    """Latents beyond the decoder's tanh clamp (|z| > 3) included: the clamp itself is compared."""
    config, model, ours = tiny
    latents = _normal((2, 8, 12, 4), seed=2) * 2
    assert np.abs(latents).max() > 3
    out = np.array(ours.decode(mx.array(latents)))
    assert out.shape == (2, 64, 96, 3) and ours.dtype == mx.float32
    error = relative_error(out, torch_decode(model, latents))
    print(f"tiny decode fp32: {error:.2e}")
    assert error <= FP32_BOUND


def test_encode_fp32(tiny):
    """61x67 is not a multiple of 8: the stride-2 convolutions (padding 1) round sizes up."""
    config, model, ours = tiny
    for height, width, latent in ((64, 72, (8, 9)), (61, 67, (8, 9))):
        images = _images((2, height, width, 3), seed=3)
        out = np.array(ours.encode(mx.array(images)))
        assert out.shape == (2, *latent, 4)
        error = relative_error(out, torch_tiny_encode(model, images))
        print(f"tiny encode fp32 {height}x{width}: {error:.2e}")
        assert error <= FP32_BOUND



def test_decode_and_encode_run_in_a_reused_heap(tiny, code_path, monkeypatch):
    """On the CPU kernels the tiny VAE's decoder and encoder evaluate inside ``cpu.heap``'s reused
    heap, as AutoencoderKL's do: their 64-channel activations are 64 MiB each at 512 px, fresh
    memory on every call outside it. The plain path (Metal's code) is left as it is."""
    from mlx_unet.cpu import heap, vae

    config, model, ours = tiny
    depths, evaluate = [], vae._evaluated_in_reused_heap
    monkeypatch.setattr(vae, "_evaluated_in_reused_heap",
                        lambda forward, x: evaluate(lambda y: depths.append(heap._depth) or forward(y), x))
    latents, images = _normal((1, 8, 8, 4), seed=5), _images((1, 64, 64, 3), seed=6)
    decoded, encoded = np.array(ours.decode(mx.array(latents))), np.array(ours.encode(mx.array(images)))
    inside = [1, 1] if heap.available() else [0, 0]
    assert depths == (inside if code_path == "cpu-kernels" else [])
    assert heap._depth == 0
    assert relative_error(decoded, torch_decode(model, latents)) <= FP32_BOUND
    assert relative_error(encoded, torch_tiny_encode(model, images)) <= FP32_BOUND


def test_each_upsampling_runs_with_the_convolution_after_it(tiny, code_path, monkeypatch):
    """On the CPU kernels the decoder computes each 2x upsampling and the convolution listed after
    it as four 2x2 convolutions at the source size (``cpu/upsample.py``), still as diffusers'
    decode within float32 rounding; the plain path upsamples, then convolves."""
    from mlx_unet.cpu import vae

    config, model, ours = tiny
    fused, run = [], vae.upsampled_and_convolved
    monkeypatch.setattr(vae, "upsampled_and_convolved", lambda conv, x: fused.append(x.shape) or run(conv, x))
    latents = _normal((2, 8, 12, 4), seed=7)
    error = relative_error(np.array(ours.decode(mx.array(latents))), torch_decode(model, latents))
    upsamplings = len(config.num_decoder_blocks) - 1
    width = config.decoder_block_out_channels[0]
    expected = [(2, 8 * 2**level, 12 * 2**level, width) for level in range(upsamplings)]
    assert fused == (expected if code_path == "cpu-kernels" else [])
    assert error <= FP32_BOUND

@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype):
    config = TinyVAEConfig.from_preset("tiny")
    model = torch_tiny_vae(config, seed=4)
    model_half = torch_tiny_vae(config, seed=4, dtype=getattr(torch, dtype))
    ours = mlx_tiny_vae_from_torch(model, config, dtype=getattr(mx, dtype))
    latents = _normal((1, 8, 8, 4), seed=5)
    images = _images((1, 64, 64, 3), seed=6)
    for what, run, theirs, x in (("decode", ours.decode, torch_decode, latents),
                                 ("encode", ours.encode, torch_tiny_encode, images)):
        out = run(mx.array(x))
        assert out.dtype == cpu.computes_in(getattr(mx, dtype))
        exact = theirs(model, x)
        ours_error = relative_error(np.array(out.astype(mx.float32)), exact)
        theirs_error = relative_error(theirs(model_half, x), exact)
        print(f"tiny {what} {dtype} vs diffusers fp32: ours {ours_error:.2e}, diffusers {dtype} {theirs_error:.2e}")
        assert ours_error <= HALF_VS_DIFFUSERS_HALF * theirs_error


@pytest.mark.usefixtures("code_path")
def test_taesd_widths_decode_and_encode():
    """TAESD's and TAESDXL's architecture (64 channels, 1-3-3-3 / 3-3-3-1 blocks) at 32x32 pixels."""
    config = TinyVAEConfig.from_preset("taesd")
    model = torch_tiny_vae(config, seed=7)
    ours = mlx_tiny_vae_from_torch(model, config)
    latents = _normal((1, 4, 4, 4), seed=8)
    images = _images((1, 32, 32, 3), seed=9)
    decode_error = relative_error(np.array(ours.decode(mx.array(latents))), torch_decode(model, latents))
    encode_error = relative_error(np.array(ours.encode(mx.array(images))), torch_tiny_encode(model, images))
    print(f"TAESD widths fp32: decode {decode_error:.2e}, encode {encode_error:.2e}")
    assert max(decode_error, encode_error) <= FP32_BOUND


# ---------------------------------------------------------------------- config


def test_config_round_trips_and_reads_what_diffusers_writes(tmp_path):
    for name in ("taesd", "tiny"):
        config = TinyVAEConfig.from_preset(name)
        assert TinyVAEConfig.from_dict(config.to_diffusers_dict()) == config
    # diffusers adds block_out_channels and force_upcast to the file: both read past.
    torch_tiny_vae(TinyVAEConfig.from_preset("tiny")).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {"block_out_channels", "force_upcast"} <= saved.keys()
    assert TinyVAEConfig.from_json(tmp_path) == TinyVAEConfig.from_preset("tiny")
    assert TinyVAEConfig.from_dict({"_class_name": "AutoencoderTiny", "act_fn": "ReLU"}) == TinyVAEConfig()


_BAD_CONFIGS = [
    ({"_class_name": "AutoencoderKL"}, "describes a AutoencoderKL"),
    ({"act_fn": "silu"}, "act_fn"),
    ({"upsample_fn": "bilinear"}, "upsample_fn"),
    ({"upsampling_scaling_factor": 4}, "upsampling_scaling_factor"),
    ({"shift_factor": 0.0609}, "shift_factor"),
    ({"encoder_block_out_channels": [32, 64, 64, 64]}, "changes width"),
    ({"decoder_block_out_channels": []}, "non-empty list"),
    ({"num_decoder_blocks": [3, 3, 3]}, "one block count per level"),
    ({"num_encoder_blocks": [1, -1, 3, 3]}, "num_encoder_blocks"),
    ({"scaling_factor": 0}, "scaling_factor"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"frobnicate": 1}, "frobnicate"),
]


def test_bad_config(tmp_path):
    # One test item for all cases: each item costs a gc pass in conftest's teardown.
    for change, message in _BAD_CONFIGS:
        with pytest.raises(ConfigError, match=message):
            TinyVAEConfig.from_dict({**TinyVAEConfig.from_preset("taesd").to_diffusers_dict(), **change})
    with pytest.raises(ConfigError, match="no tiny VAE config"):
        AutoencoderTiny.from_pretrained(tmp_path)


def test_input_checks():
    ours = AutoencoderTiny(TinyVAEConfig.from_preset("tiny"))
    with pytest.raises(InputError, match="NCHW"):
        ours.decode(mx.zeros((1, 4, 8, 8)))
    with pytest.raises(InputError, match="must be an mlx array"):
        ours.encode(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(InputError, match="floating point"):
        ours.encode(mx.zeros((1, 8, 8, 3), dtype=mx.uint8))


# ---------------------------------------------------------------------- conversion


def test_converts_a_diffusers_folder_and_a_hub_snapshot(tmp_path, monkeypatch):
    """What save_pretrained writes, as a folder and as the Hub's madebyollin/taesdxl (offline cache):
    written alone, in --dtype, and loaded by AutoencoderTiny.from_pretrained."""
    config = TinyVAEConfig.from_preset("tiny")
    model = torch_tiny_vae(config, seed=10)
    latents = _normal((1, 6, 5, 4), seed=11)
    expected = torch_decode(model, latents)

    model.save_pretrained(tmp_path / "diffusers")
    result = convert(tmp_path / "diffusers", tmp_path / "mlx", dtype="float32", progress=False)
    assert result.config is None and result.configs == {"tiny_vae": config} and result.dtypes == {"tiny_vae": "float32"}
    assert sorted(p.name for p in (tmp_path / "mlx").iterdir()) == ["config.json", "model.safetensors"]
    ours = AutoencoderTiny.from_pretrained(tmp_path / "mlx")
    assert ours.config == config and ours.dtype == mx.float32
    assert relative_error(np.array(ours.decode(mx.array(latents))), expected) <= FP32_BOUND

    cache = hub_snapshot(model, tmp_path, "madebyollin/taesdxl")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    result = convert("madebyollin/taesdxl", tmp_path / "hub-mlx", progress=False)  # convert's default: float16
    assert result.dtypes == {"tiny_vae": "float16"}
    ours = AutoencoderTiny.from_pretrained(tmp_path / "hub-mlx")
    assert ours.dtype == cpu.computes_in(mx.float16) and ours.decoder.layers[0].weight.dtype == mx.float16
    assert relative_error(np.array(ours.decode(mx.array(latents)).astype(mx.float32)), expected) <= 1e-2

    (tmp_path / "unet.json").write_text(json.dumps(tiny_config("sd15").to_diffusers_dict()))
    with pytest.raises(ConversionError, match="holds a tiny VAE"):
        convert(tmp_path / "diffusers", tmp_path / "x", config=tmp_path / "unet.json", progress=False)
    assert not (tmp_path / "x").exists()
