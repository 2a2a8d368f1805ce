"""Prompt to image against diffusers' StableDiffusionXLPipeline, end to end, on small random
components: the diffusers pipeline is saved, converted whole by our converter, loaded by
SDXLPipeline, and both make an image from the same prompt and initial latents."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from original_layout import SINGLE_FILE_FAMILIES, sdxl_single_file
from reference import init_every_parameter, tiny_config, torch_unet
from reference_text import torch_text_encoder
from reference_vae import torch_vae
from safetensors.torch import save_file
from tokenizer_files import write_clip_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from mlx_unet.conversion import convert
from mlx_unet import CLIPTextConfig as OurTextConfig
from mlx_unet import VAEConfig
from mlx_unet.generate import main as generate_main
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG
from mlx_unet import PipelineError, SDXLPipeline

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of an astronaut riding a horse, 35mm"
SIZE = 64  # pixels; 8x8 latents


def _text_encoder(cls, seed: int, **fields):
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **fields)
    model = cls(config)
    init_every_parameter(model, seed)
    return model.eval()


def _vae(seed: int) -> AutoencoderKL:
    # Four levels: the 8x pixel-to-latent scale of every SD VAE.
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=SIZE, scaling_factor=0.13025)
    init_every_parameter(vae, seed)
    # Random decoder weights blow values up level by level; a smaller output conv keeps the image
    # inside [-1, 1] mostly, so that the comparison is not of clamped saturated pixels.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
        vae.decoder.conv_out.bias.mul_(0.2)
    return vae.eval()


def _pipeline(tmp: Path, refiner: bool):
    """A diffusers SDXL (or refiner) pipeline of tiny random components, saved under ``tmp``."""
    seed = 70 if not refiner else 80
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    encoder_2 = _text_encoder(CLIPTextModelWithProjection, seed + 2, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu", projection_dim=40)
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "tok2", pad_token="!"))
    if refiner:
        unet = torch_unet(tiny_config("sdxl-refiner", cross_attention_dim=32,
                                      projection_class_embeddings_input_dim=40 + 5 * 8), seed=seed)
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=_vae(seed + 3), text_encoder=None, text_encoder_2=encoder_2, tokenizer=None,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
    else:
        # cross-attention width = 16 + 32 (the two encoders' states side by side); pooled 40.
        encoder = _text_encoder(CLIPTextModel, seed + 1, hidden_size=16, intermediate_size=32,
                                num_hidden_layers=3, num_attention_heads=2, hidden_act="quick_gelu")
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "tok1"))
        pipe = StableDiffusionXLPipeline(
            vae=_vae(seed + 3), text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=torch_unet(tiny_config("sdxl-base"), seed=seed), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp / ("diffusers-refiner" if refiner else "diffusers")
    pipe.save_pretrained(folder)  # (transformers 5 saves tokenizers as tokenizer.json: converted too)
    return pipe, folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t2i")
    base, base_folder = _pipeline(tmp, refiner=False)
    refiner, refiner_folder = _pipeline(tmp, refiner=True)
    convert(base_folder, tmp / "mlx", dtype="float32", progress=False)
    convert(refiner_folder, tmp / "mlx-refiner", dtype="float32", progress=False)
    return {"base": base, "refiner": refiner, "diffusers": base_folder, "mlx": tmp / "mlx",
            "mlx_refiner": tmp / "mlx-refiner"}


def _latents(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, SIZE // 8, SIZE // 8, 4), dtype=np.float32)


def _nchw(latents: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(latents).permute(0, 3, 1, 2).contiguous()


def _compare(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    error = float(np.abs(ours.astype(np.float64) - theirs).max())
    ours8 = (ours * 255).round().astype(np.int16)
    theirs8 = (theirs * 255).round().astype(np.int16)
    off = np.abs(ours8 - theirs8)
    print(f"image max abs error {error:.2e}; uint8 max diff {off.max()}, {np.mean(off > 0):.4%} of values differ")
    # The image is varied (not a flat clamp), so agreement means something.
    assert theirs.std() > 0.05 and np.mean((theirs > 0) & (theirs < 1)) > 0.5
    assert error <= 1e-3
    assert off.max() <= 1 and np.mean(off > 0) < 0.01


@torch.no_grad()
@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_text_to_image_matches_diffusers(models, negative):
    latents = _latents(2)
    theirs = models["base"](PROMPT, negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0,
                            height=SIZE, width=SIZE, num_images_per_prompt=2, latents=_nchw(latents),
                            output_type="np").images
    pipe = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    ours = pipe(PROMPT, negative, steps=4, guidance=5.0, height=SIZE, width=SIZE, num_images_per_prompt=2,
                latents=mx.array(latents), output="float")
    _compare(ours, theirs)


@torch.no_grad()
def test_base_and_refiner_hand_off_matches_diffusers(models):
    latents = _latents(1, seed=1)
    handoff = dict(num_inference_steps=5, guidance_scale=5.0)
    base_latents = models["base"](PROMPT, height=SIZE, width=SIZE, latents=_nchw(latents), denoising_end=0.6,
                                  output_type="latent", **handoff).images
    theirs = models["refiner"](PROMPT, image=base_latents, denoising_start=0.6, output_type="np", **handoff).images
    base = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    refiner = SDXLPipeline.from_pretrained(models["mlx_refiner"], dtype=mx.float32)
    ours = base(PROMPT, steps=5, guidance=5.0, height=SIZE, width=SIZE, latents=mx.array(latents),
                refiner=refiner, refiner_start=0.6, output="float")
    _compare(ours, theirs)


@torch.no_grad()
def test_original_single_file_makes_the_same_image(models, tmp_path):
    """An sgm-layout SDXL file converted whole. Its config is inferred from the tensors plus
    SDXL's known values (64-wide heads, the VAE's 32 groups), so these components keep SDXL's
    widths at cut depths."""
    text = {"num_hidden_layers": 2, "intermediate_size": 64}
    unet_config = SINGLE_FILE_FAMILIES["sdxl-base"]
    vae_config = VAEConfig.from_preset("sdxl", block_out_channels=[32, 32, 64, 64], layers_per_block=1)
    clip_l = torch_text_encoder(OurTextConfig.from_preset("sdxl-clip-l", **text), seed=91)
    bigg = torch_text_encoder(OurTextConfig.from_preset("sdxl-clip-bigg", **text), seed=92)
    unet, vae = torch_unet(unet_config, seed=90), torch_vae(vae_config, seed=93)
    path = tmp_path / "sd_xl_tiny.safetensors"
    save_file(sdxl_single_file(unet.state_dict(), unet_config, bigg.state_dict(), vae.state_dict(),
                               clip_l.state_dict()), str(path))
    base = models["base"]
    convert(path, tmp_path / "mlx", dtype="float32", tokenizers=models["diffusers"], progress=False)
    theirs_pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=bigg, tokenizer=base.tokenizer,
                                            tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler)
    theirs_pipe.set_progress_bar_config(disable=True)
    latents = _latents(1, seed=2)
    theirs = theirs_pipe(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, latents=_nchw(latents),
                         output_type="np").images
    ours = SDXLPipeline.from_pretrained(tmp_path / "mlx", dtype=mx.float32)(
        PROMPT, steps=3, height=SIZE, width=SIZE, latents=mx.array(latents), output="float")
    _compare(ours, theirs)


@torch.no_grad()
def test_img2img_matches_diffusers(models, monkeypatch):
    """An image encoded by the VAE, noised to strength 0.6, denoised. Both sides get the same
    draws: the latent distribution's noise and the img2img noise."""
    from diffusers.models.autoencoders import vae as their_vae
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as their_img2img

    from mlx_unet.models.vae import DiagonalGaussian

    rng = np.random.default_rng(5)
    image = rng.random((1, SIZE, SIZE, 3), dtype=np.float32)
    sample_noise, start_noise = _latents(1, seed=6), _latents(1, seed=7)
    monkeypatch.setattr(their_vae, "randn_tensor", lambda *a, **k: _nchw(sample_noise))
    monkeypatch.setattr(their_img2img, "randn_tensor", lambda *a, **k: _nchw(start_noise))
    monkeypatch.setattr(DiagonalGaussian, "sample", lambda self, key=None: self.mean + self.std * mx.array(sample_noise))
    theirs_pipe = StableDiffusionXLImg2ImgPipeline(**models["base"].components)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe(PROMPT, image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                         output_type="np").images
    pipe = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    ours = pipe(PROMPT, image=image, strength=0.6, steps=5, guidance=5.0, latents=mx.array(start_noise), output="float")
    _compare(ours, theirs)
    with pytest.raises(PipelineError, match="multiples of 8"):
        pipe(PROMPT, image=image[:, :60], steps=2)


def test_text_encoders_are_released_before_denoising(models):
    pipe = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    seen = []
    pipe(PROMPT, steps=2, height=SIZE, width=SIZE, seed=0, callback=lambda stage, step: seen.append(pipe._encoders))
    assert seen == [None, None]


def test_generate_command_writes_png(models, tmp_path):
    out = tmp_path / "out.png"
    args = [PROMPT, "--model", str(models["mlx"]), "-o", str(out), "--steps", "2", "--height", "64",
            "--width", "64", "--seed", "3", "--dtype", "float32", "-n", "2"]
    assert generate_main(args) == 0
    pipe = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    expected = pipe(PROMPT, steps=2, height=SIZE, width=SIZE, seed=3, num_images_per_prompt=2)
    for path, image in zip([out, tmp_path / "out-1.png"], expected):
        assert _read_png(path).tolist() == image.tolist()


def _read_png(path: Path) -> np.ndarray:
    """Our PNG read back by a decoder that is not ours (Pillow, which diffusers requires)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def test_generate_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mlx_unet.generate", "a cat", "--model", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "model_index.json" in result.stderr
    assert "--model" in subprocess.run([sys.executable, "-m", "mlx_unet.generate", "--help"],
                                       capture_output=True, text=True, cwd=ROOT).stdout


def test_folders_that_are_not_converted_pipelines_are_refused(models):
    with pytest.raises(PipelineError, match="model_index.json.*--unet-only"):
        SDXLPipeline.from_pretrained(models["mlx"] / "unet")
    with pytest.raises(PipelineError, match="diffusers pipeline .PyTorch weights., not a converted one"):
        SDXLPipeline.from_pretrained(models["diffusers"])
