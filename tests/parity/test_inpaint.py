"""Inpainting against diffusers' StableDiffusionXLInpaintPipeline and StableDiffusionInpaintPipeline,
end to end on small random components: 9-channel inpainting UNets (mask and masked image as
extra input) and ordinary 4-channel UNets (the known region blended back after every step).

Both sides get the same draws: the starting noise (diffusers' ``randn_tensor`` in the pipeline's
module; our ``latents``) and the VAE's latent-distribution draws (``SharedDraws``), which must
also come in the same order and number: which images each side encodes is part of the check.
"""

import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from inpaint_files import inpainting_pipelines
from pipeline_files import SIZE
from image_runs import PROMPT, SharedDraws, compare_images, nchw, noise_latents

from mlx_unet import InputError, PipelineError, load_pipeline
from mlx_unet.pipelines.inpaint import binary_mask, latent_mask

STEPS = 4


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return inpainting_pipelines(tmp_path_factory.mktemp("sdxl-inpaint"), "sdxl")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return inpainting_pipelines(tmp_path_factory.mktemp("sd1-inpaint"), "sd1")


def _image(seed: int) -> np.ndarray:
    """uint8 pixels (1, SIZE, SIZE, 3): ours takes them as they are, diffusers as floats / 255."""
    return np.random.default_rng(seed).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)


def _mask() -> np.ndarray:
    """A soft-edged disc, (1, SIZE, SIZE) floats in [0, 1]: grey levels on both sides of the 0.5
    threshold, and an edge that crosses the 8x8 blocks, so that both the binarisation and the
    choice of pixel per latent matter."""
    y, x = np.mgrid[:SIZE, :SIZE]
    distance = np.hypot(y - 0.4 * SIZE, x - 0.55 * SIZE) / (0.3 * SIZE)
    return np.clip(1.5 - distance, 0, 1).astype(np.float32)[None]


def _run_both(monkeypatch, theirs_pipe, mlx_folder, *, strength, guidance, seed, batch=1, uint8_mask=False):
    """The same inpainting on both sides; returns (ours, theirs, the draws)."""
    draws = SharedDraws(seed).install(monkeypatch)
    noise = noise_latents(batch, seed=seed + 1)
    monkeypatch.setattr(sys.modules[type(theirs_pipe).__module__], "randn_tensor", lambda *a, **k: nchw(noise))
    image, mask = _image(seed + 2), _mask()
    our_mask = mask
    if uint8_mask:  # ours reads uint8 as diffusers reads a PNG mask: / 255
        our_mask = (mask[..., None] * 255).round().astype(np.uint8)
        mask = our_mask[..., 0].astype(np.float32) / 255
    theirs = theirs_pipe(PROMPT, image=image.astype(np.float32) / 255, mask_image=mask, strength=strength,
                         num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
                         num_images_per_prompt=batch, output_type="np").images
    ours = load_pipeline(mlx_folder, dtype=mx.float32)(
        PROMPT, image=image, mask_image=our_mask, strength=strength, steps=STEPS, guidance=guidance,
        num_images_per_prompt=batch, latents=mx.array(noise), output="float")
    return ours, theirs, draws


@torch.no_grad()
@pytest.mark.usefixtures("code_path")  # the whole run on the CPU kernels and on plain MLX
def test_sdxl_inpainting_model_matches_diffusers(sdxl, monkeypatch):
    """From pure noise (strength 1): only the masked image is encoded, two images of one prompt."""
    ours, theirs, draws = _run_both(monkeypatch, sdxl["inpaint"], sdxl["mlx_inpaint"], strength=1.0, seed=20,
                                    batch=2, uint8_mask=True, guidance=5.0)
    compare_images(ours, theirs)
    assert draws.theirs == draws.ours == 1


@torch.no_grad()
def test_sdxl_inpainting_model_below_full_strength_matches_diffusers(sdxl, monkeypatch):
    """Strength 0.6: the image's latents noised to the first step's level start the run; the
    image is encoded, then the masked image."""
    ours, theirs, draws = _run_both(monkeypatch, sdxl["inpaint"], sdxl["mlx_inpaint"], strength=0.6, seed=30,
                                    guidance=5.0)
    compare_images(ours, theirs)
    assert draws.theirs == draws.ours == 2


@torch.no_grad()
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sdxl_ordinary_model_inpaints_by_blending_as_diffusers(sdxl, monkeypatch, strength):
    """A 4-channel UNet: the known region put back after every step. diffusers also encodes the
    masked image, which such a UNet never sees; we do not (one draw fewer, the last)."""
    ours, theirs, draws = _run_both(monkeypatch, sdxl["legacy"], sdxl["mlx_legacy"], strength=strength, seed=40,
                                    guidance=5.0)
    compare_images(ours, theirs)
    assert (draws.theirs, draws.ours) == (2, 1)


@torch.no_grad()
@pytest.mark.usefixtures("code_path")
def test_sd1_inpainting_model_matches_diffusers(sd1, monkeypatch):
    ours, theirs, draws = _run_both(monkeypatch, sd1["inpaint"], sd1["mlx_inpaint"], strength=1.0, seed=50,
                                    guidance=7.5)
    compare_images(ours, theirs)
    assert draws.theirs == draws.ours == 1


@torch.no_grad()
def test_sd1_ordinary_model_inpaints_by_blending_as_diffusers(sd1, monkeypatch):
    """DDIM (SD 1.x's scheduler) noises the known region by timestep, not by step index."""
    ours, theirs, draws = _run_both(monkeypatch, sd1["legacy"], sd1["mlx_legacy"], strength=0.8, seed=60,
                                    guidance=7.5)
    compare_images(ours, theirs)
    assert (draws.theirs, draws.ours) == (2, 1)


@pytest.mark.parametrize("size", [(SIZE, SIZE), (48, 80)])
def test_mask_at_latent_size_is_torch_nearest_interpolation(size):
    """diffusers' prepare_mask_latents: torch.nn.functional.interpolate at its default mode."""
    mask = (np.random.default_rng(1).random((2, *size)) > 0.5).astype(np.float32)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(mask)[:, None], size=(size[0] // 8, size[1] // 8))
    ours = latent_mask(binary_mask(mask))
    assert np.array_equal(np.array(ours)[..., 0], theirs[:, 0].numpy())


def test_inpainting_arguments_are_checked_before_any_work(sdxl, monkeypatch):
    pipe = load_pipeline(sdxl["mlx_inpaint"], dtype=mx.float32)
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("encoded before the check"))
    image, mask = _image(1), _mask()
    run = dict(steps=2, image=image)
    with pytest.raises(PipelineError, match=r"mask_image is 64x48 and the image 64x64; give a mask of the image's"):
        pipe(PROMPT, mask_image=mask[:, :, :48], **run)
    with pytest.raises(PipelineError, match=r"mask_image must be \(1, height, width\) or \(1, height, width, 1\), "
                                            r"one grey level per pixel, got shape \(1, 64, 64, 3\)"):
        pipe(PROMPT, mask_image=np.repeat(mask[..., None], 3, axis=-1), **run)
    with pytest.raises(InputError, match=r"mask_image holds values outside \[0, 1\]"):
        pipe(PROMPT, mask_image=mask * 255, **run)
    with pytest.raises(InputError, match="mask_image needs image"):
        pipe(PROMPT, mask_image=mask, steps=2)
    with pytest.raises(InputError, match="inpainting runs without a refiner"):
        pipe(PROMPT, mask_image=mask, refiner=pipe, **run)
    with pytest.raises(InputError, match="this UNet takes 9 input channels: it is an inpainting model; give an image "
                                         "and a mask"):
        pipe(PROMPT, steps=2, height=SIZE, width=SIZE)
