"""SD 1.x and 2.x, prompt to image, against diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline, end to end on small random components: each diffusers pipeline is
saved, converted whole by our converter and loaded by ``load_pipeline``; both make an image from
the same prompt and draws."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from axes import CODE_PATHS, each_value_once
from diffusers import StableDiffusionImg2ImgPipeline
from image_runs import PROMPT, compare_images, nchw, noise_latents, same_img2img_draws
from pipeline_files import SIZE
from reference import relative_error
from sd_image_pipelines import converted_sd_pipeline

from mlx_unet import InputError, PipelineError, SDPipeline, SDXLPipeline, cpu, load_pipeline
from mlx_unet.convert import convert


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return converted_sd_pipeline(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return converted_sd_pipeline(tmp_path_factory.mktemp("sd2"), "sd2")


@torch.no_grad()
@pytest.mark.parametrize("code_path,negative", each_value_once(list(CODE_PATHS), [None, "blurry, low quality"]),
                         indirect=["code_path"])  # the whole run on the CPU kernels and on plain MLX
def test_sd1_text_to_image_matches_diffusers(sd1, code_path, negative):
    latents = noise_latents(2)
    theirs = sd1["pipe"](PROMPT, negative_prompt=negative, num_inference_steps=4, guidance_scale=7.5, height=SIZE,
                         width=SIZE, num_images_per_prompt=2, latents=nchw(latents), output_type="np").images
    pipe = load_pipeline(sd1["mlx"], dtype=mx.float32)
    assert type(pipe) is SDPipeline and pipe.scheduler().__class__.__name__.startswith("DDIM")
    ours = pipe(PROMPT, negative, steps=4, guidance=7.5, height=SIZE, width=SIZE, num_images_per_prompt=2,
                latents=mx.array(latents), output="float")
    compare_images(ours, theirs)


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_clip_skip_matches_diffusers(sd1, clip_skip, monkeypatch):
    # diffusers' clip_skip reads text_encoder.text_model.final_layer_norm, which transformers 5's
    # CLIPTextModel keeps at its top level: the same module, under the name diffusers expects.
    encoder = sd1["pipe"].text_encoder
    if not hasattr(encoder, "text_model"):
        monkeypatch.setattr(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm),
                            raising=False)
    latents = noise_latents(1, seed=3)
    run = dict(num_inference_steps=3, guidance_scale=7.5, height=SIZE, width=SIZE)
    theirs = sd1["pipe"](PROMPT, clip_skip=clip_skip, latents=nchw(latents), output_type="np", **run).images
    plain = sd1["pipe"](PROMPT, latents=nchw(latents), output_type="np", **run).images
    assert np.abs(theirs - plain).max() > 1e-2  # the skip changes the image: the comparison means something
    ours = load_pipeline(sd1["mlx"], dtype=mx.float32)(PROMPT, steps=3, guidance=7.5, height=SIZE, width=SIZE,
                                                        clip_skip=clip_skip, latents=mx.array(latents),
                                                        output="float")
    compare_images(ours, theirs)


@torch.no_grad()
@pytest.mark.usefixtures("code_path")
def test_sd2_v_prediction_matches_diffusers(sd2):
    assert sd2["pipe"].scheduler.config.prediction_type == "v_prediction"
    latents = noise_latents(1, seed=4)
    theirs = sd2["pipe"](PROMPT, negative_prompt="ugly", num_inference_steps=4, guidance_scale=6.0, height=SIZE,
                         width=SIZE, latents=nchw(latents), output_type="np").images
    pipe = load_pipeline(sd2["mlx"], dtype=mx.float32)
    assert type(pipe) is SDPipeline
    ours = pipe(PROMPT, "ugly", steps=4, guidance=6.0, height=SIZE, width=SIZE, latents=mx.array(latents),
                output="float")
    compare_images(ours, theirs)


@torch.no_grad()
@pytest.mark.parametrize("code_path,family", each_value_once(list(CODE_PATHS), ["sd1", "sd2"]), indirect=["code_path"])
def test_half_precision_runs_stay_near_diffusers_float32(sd1, sd2, tmp_path, code_path, family):
    """The run users get by default: converted to float16 (UNet and text encoder; the VAE as
    its config says), per image against diffusers in float32."""
    models = {"sd1": sd1, "sd2": sd2}[family]
    convert(models["diffusers"], tmp_path / "fp16", dtype="float16", progress=False)
    pipe = load_pipeline(tmp_path / "fp16")
    assert pipe.unet.dtype == cpu.computes_in(mx.float16)  # on the CPU kernels: float32 from float16 weights
    latents = noise_latents(1, seed=13)
    theirs = models["pipe"](PROMPT, num_inference_steps=3, guidance_scale=7.5, height=SIZE, width=SIZE,
                            latents=nchw(latents), output_type="np").images
    ours = pipe(PROMPT, steps=3, guidance=7.5, height=SIZE, width=SIZE, latents=mx.array(latents), output="float")
    assert theirs.std() > 0.05  # a varied image, not a flat clamp
    error = relative_error(ours, theirs)
    print(f"{family} float16 against diffusers float32: {error:.1e}")
    assert error <= 1e-2


@torch.no_grad()
def test_sd1_img2img_matches_diffusers(sd1, monkeypatch):
    """An image encoded by the VAE, noised to strength 0.6, denoised; both sides get the same
    draws (the latent distribution's noise and the img2img noise)."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as their_img2img

    image = np.random.default_rng(8).random((1, SIZE, SIZE, 3), dtype=np.float32)
    start_noise = same_img2img_draws(monkeypatch, their_img2img, seed=9)
    theirs_pipe = StableDiffusionImg2ImgPipeline(**sd1["pipe"].components)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe(PROMPT, image=image, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
                         output_type="np").images
    ours = load_pipeline(sd1["mlx"], dtype=mx.float32)(PROMPT, image=image, strength=0.6, steps=5, guidance=7.5,
                                                        latents=mx.array(start_noise), output="float")
    compare_images(ours, theirs)


@torch.no_grad()
def test_prompt_embeds_encoded_once_make_the_same_image(sd1):
    pipe = load_pipeline(sd1["mlx"], dtype=mx.float32)
    latents = mx.array(noise_latents(1, seed=11))
    run = dict(steps=2, guidance=7.5, height=SIZE, width=SIZE, latents=latents)
    direct = pipe(PROMPT, "dark", **run)
    embeddings = pipe.encode_prompt(PROMPT, "dark")
    assert np.array_equal(pipe(None, prompt_embeds=embeddings, **run), direct)
    with pytest.raises(InputError, match="negative_prompt goes with prompt, not prompt_embeds"):
        pipe(None, "dark", prompt_embeds=embeddings, **run)


def test_an_sd_folder_is_not_an_sdxl_pipeline(sd1):
    with pytest.raises(PipelineError, match=r"holds an SD-like .* pipeline, not one SDXLPipeline runs; load it with "
                                            r"mlx_unet.load_pipeline"):
        SDXLPipeline.from_pretrained(sd1["mlx"])
    pipe = load_pipeline(sd1["mlx"], dtype=mx.float32)
    with pytest.raises(InputError, match="prompt_2 and negative_prompt_2 are for SDXL's second text encoder"):
        pipe.encode_prompt(PROMPT, prompt_2="x")
    with pytest.raises(InputError, match=r"a refiner finishes an SDXL base model's images; this run pairs an SD-like "
                                         r"\(24-wide text\) base with an SD-like \(24-wide text\) refiner"):
        pipe(PROMPT, steps=2, refiner=pipe)
