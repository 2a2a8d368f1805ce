"""Prompt to image against diffusers' StableDiffusionXLPipeline, end to end, on small random
components: the diffusers pipeline is saved, converted whole by our converter, loaded by
SDXLPipeline, and both make an image from the same prompt and initial latents."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from axes import CODE_PATHS, each_value_once
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from image_runs import PROMPT, compare_images, nchw, noise_latents, same_img2img_draws
from original_layout import SINGLE_FILE_FAMILIES, sdxl_single_file
from pipeline_files import SIZE, converted_pipelines
from reference import torch_unet
from reference_text import torch_text_encoder
from reference_vae import torch_vae
from safetensors.torch import save_file

from mlx_unet import CLIPTextConfig as OurTextConfig
from mlx_unet import PipelineError, SDXLPipeline, VAEConfig, load_pipeline
from mlx_unet.configs.base import FORMAT_KEY
from mlx_unet.convert import convert


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return converted_pipelines(tmp_path_factory.mktemp("t2i"))


@torch.no_grad()
@pytest.mark.parametrize("code_path,negative", each_value_once(list(CODE_PATHS), [None, "blurry, low quality"]),
                         indirect=["code_path"])  # the whole run on the CPU kernels and on plain MLX
def test_text_to_image_matches_diffusers(models, code_path, negative):
    latents = noise_latents(2)
    theirs = models["base"](PROMPT, negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0,
                            height=SIZE, width=SIZE, num_images_per_prompt=2, latents=nchw(latents),
                            output_type="np").images
    pipe = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    ours = pipe(PROMPT, negative, steps=4, guidance=5.0, height=SIZE, width=SIZE, num_images_per_prompt=2,
                latents=mx.array(latents), output="float")
    compare_images(ours, theirs)


@torch.no_grad()
def test_clip_skip_matches_diffusers(models):
    latents = noise_latents(1, seed=12)
    run = dict(negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE)
    theirs = models["base"](PROMPT, clip_skip=1, latents=nchw(latents), output_type="np", **run).images
    plain = models["base"](PROMPT, latents=nchw(latents), output_type="np", **run).images
    assert np.abs(theirs - plain).max() > 1e-2  # the skip changes the image: the comparison means something
    ours = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)(
        PROMPT, "blurry", steps=3, guidance=5.0, height=SIZE, width=SIZE, clip_skip=1, latents=mx.array(latents),
        output="float")
    compare_images(ours, theirs)


@torch.no_grad()
def test_base_and_refiner_hand_off_matches_diffusers(models):
    latents = noise_latents(1, seed=1)
    handoff = dict(num_inference_steps=5, guidance_scale=5.0)
    base_latents = models["base"](PROMPT, height=SIZE, width=SIZE, latents=nchw(latents), denoising_end=0.6,
                                  output_type="latent", **handoff).images
    theirs = models["refiner"](PROMPT, image=base_latents, denoising_start=0.6, output_type="np", **handoff).images
    base = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    refiner = SDXLPipeline.from_pretrained(models["mlx_refiner"], dtype=mx.float32)
    ours = base(PROMPT, steps=5, guidance=5.0, height=SIZE, width=SIZE, latents=mx.array(latents),
                refiner=refiner, refiner_start=0.6, output="float")
    compare_images(ours, theirs)


@pytest.mark.slow
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
    latents = noise_latents(1, seed=2)
    theirs = theirs_pipe(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, latents=nchw(latents),
                         output_type="np").images
    ours = SDXLPipeline.from_pretrained(tmp_path / "mlx", dtype=mx.float32)(
        PROMPT, steps=3, height=SIZE, width=SIZE, latents=mx.array(latents), output="float")
    compare_images(ours, theirs)


@torch.no_grad()
def test_img2img_matches_diffusers(models, monkeypatch):
    """An image encoded by the VAE, noised to strength 0.6, denoised. Both sides get the same
    draws: the latent distribution's noise and the img2img noise."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as their_img2img

    image = np.random.default_rng(5).random((1, SIZE, SIZE, 3), dtype=np.float32)
    start_noise = same_img2img_draws(monkeypatch, their_img2img, seed=6)
    theirs_pipe = StableDiffusionXLImg2ImgPipeline(**models["base"].components)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe(PROMPT, image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                         output_type="np").images
    pipe = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    ours = pipe(PROMPT, image=image, strength=0.6, steps=5, guidance=5.0, latents=mx.array(start_noise), output="float")
    compare_images(ours, theirs)
    with pytest.raises(PipelineError, match="multiples of 8"):
        pipe(PROMPT, image=image[:, :60], steps=4)


def test_load_pipeline_gives_sdxl_folders_the_sdxl_class(models):
    assert type(load_pipeline(models["mlx"])) is SDXLPipeline
    assert type(load_pipeline(models["mlx_refiner"])) is SDXLPipeline


def test_text_encoders_are_released_before_denoising(models):
    pipe = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    seen = []
    pipe(PROMPT, steps=2, height=SIZE, width=SIZE, seed=0, callback=lambda stage, step: seen.append(pipe._encoders))
    assert seen == [None, None]


def test_folders_that_are_not_converted_pipelines_are_refused(models, tmp_path):
    with pytest.raises(PipelineError, match="model_index.json.*--unet-only"):
        SDXLPipeline.from_pretrained(models["mlx"] / "unet")
    with pytest.raises(PipelineError, match="diffusers pipeline .PyTorch weights., not a converted one"):
        SDXLPipeline.from_pretrained(models["diffusers"])
    index = json.loads((models["mlx"] / "model_index.json").read_text())
    for version, fix in (("2", "upgrade mlx-unet"), ("0", "convert the model again")):
        (tmp_path / "model_index.json").write_text(json.dumps({**index, FORMAT_KEY: version}))
        with pytest.raises(PipelineError, match=f"converted in format '{version}'.*; {fix}"):
            SDXLPipeline.from_pretrained(tmp_path)
