"""Inpainting's pieces in MLX alone: the mask as diffusers' mask processor makes it, the checks
on what a caller hands in, and the sampler's two hooks (a 9-channel UNet's extra input, a
4-channel UNet's blend). Parity with diffusers end to end is tests/parity/test_inpaint.py."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_unet import InputError, PipelineError, Sampler, UNet2DConditionModel, UNetConfig
from mlx_unet.pipelines.inpaint import Inpainting, binary_mask, check_arguments, check_mask, latent_mask
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG, make_scheduler

SIZE = 32  # pixels: 4x4 latents


def test_mask_is_binarised_at_half_as_diffusers_reads_a_png():
    grey = np.array([[[0, 127, 128, 255]]], dtype=np.uint8)  # (1, 1, 4)
    assert np.array_equal(np.array(binary_mask(grey))[0, 0, :, 0], [0, 0, 1, 1])
    floats = np.array([[[0.0, 0.4999, 0.5, 1.0]]], dtype=np.float32)
    assert np.array_equal(np.array(binary_mask(floats[..., None]))[0, 0, :, 0], [0, 0, 1, 1])
    assert np.array_equal(np.array(binary_mask(mx.array(floats > 0.2)))[0, 0, :, 0], [0, 1, 1, 1])


def test_mask_at_latent_size_takes_each_blocks_top_left_pixel():
    mask = np.zeros((1, 16, 16, 1), dtype=np.float32)
    mask[0, 8, 0] = 1  # top-left of block (1, 0)
    mask[0, 1:8, 9:16] = 1  # block (0, 1) but for its top-left pixel
    assert np.array_equal(np.array(latent_mask(mx.array(mask)))[0, ..., 0], [[0, 0], [1, 0]])


@pytest.mark.parametrize("mask, error, message", [
    ([[0, 1]], InputError, "mask_image must be a numpy or MLX array"),
    (np.ones((1, SIZE, SIZE, 3)), PipelineError, r"one grey level per pixel, got shape \(1, 32, 32, 3\)"),
    (np.ones((3, SIZE, SIZE)), PipelineError, r"mask_image must be \(1 or 2, height, width\)"),
    (np.ones((1, SIZE, 24)), PipelineError, "mask_image is 32x24 and the image 32x32; give a mask of the image's size"),
    (np.full((1, SIZE, SIZE), np.nan, dtype=np.float32), InputError, "mask_image holds NaN"),
    (np.full((1, SIZE, SIZE), 2.0, dtype=np.float32), InputError, r"mask_image holds values outside \[0, 1\]"),
    (np.full((1, SIZE, SIZE), 255, dtype=np.int32), InputError, r"mask_image holds values outside \[0, 1\]"),
])
def test_bad_masks_are_refused_in_one_sentence(mask, error, message):
    with pytest.raises(error, match=message):
        check_mask(mask, (SIZE, SIZE), batch=2)


def test_masks_of_one_or_every_image_pass():
    for mask in (np.ones((1, SIZE, SIZE), np.uint8), np.zeros((2, SIZE, SIZE, 1), np.float32), mx.ones((1, SIZE, SIZE))):
        check_mask(mask, (SIZE, SIZE), batch=2)


def _inpainting(batch: int, concatenated: bool) -> Inpainting:
    rng = np.random.default_rng(0)
    mask = mx.array((rng.random((batch, SIZE // 8, SIZE // 8, 1)) > 0.5).astype(np.float32))
    latents = mx.array(rng.standard_normal((batch, SIZE // 8, SIZE // 8, 4), dtype=np.float32))
    return Inpainting(mask, latents, latents * 2 if concatenated else None)


def test_a_9_channel_unet_gets_the_mask_and_masked_image_in_both_guidance_halves():
    inpainting = _inpainting(2, concatenated=True)
    extra = inpainting.extra_channels(guided=True)
    assert extra.shape == (4, SIZE // 8, SIZE // 8, 5)
    single = mx.concatenate([inpainting.mask, inpainting.masked_image_latents], axis=-1)
    assert mx.array_equal(extra[:2], single) and mx.array_equal(extra[2:], single)
    assert mx.array_equal(inpainting.extra_channels(guided=False), single)
    assert _inpainting(2, concatenated=False).extra_channels(guided=True) is None


def test_full_strength_starts_from_noise_scaled_as_text_to_image():
    scheduler = make_scheduler("euler", SDXL_SCHEDULER_CONFIG)
    scheduler.set_timesteps(4)
    noise = mx.ones((1, 4, 4, 4))
    start = _inpainting(1, concatenated=True).start(scheduler, noise, scheduler.timesteps[:1], 1.0)
    assert mx.allclose(start, noise * scheduler.init_noise_sigma)


def _sampler(in_channels: int) -> tuple[Sampler, mx.array, mx.array]:
    config = UNetConfig.from_preset("tiny", in_channels=in_channels)
    sampler = Sampler(UNet2DConditionModel(config), make_scheduler("euler", SDXL_SCHEDULER_CONFIG), compile=False)
    return sampler, mx.zeros((1, 77, config.cross_attention_dim)), mx.zeros((1, 40))


def test_an_ordinary_unet_ends_on_the_images_latents_outside_the_mask():
    """The blend after the last step puts back the image's latents as they are (not noised)."""
    sampler, context, pooled = _sampler(4)
    inpainting = _inpainting(1, concatenated=False)
    latents = sampler(context, pooled, inpainting=inpainting, strength=1.0, num_inference_steps=2, guidance_scale=1.0,
                      seed=0)
    keep = inpainting.mask == 0
    assert mx.array_equal(mx.where(keep, latents, 0), mx.where(keep, inpainting.image_latents, 0))
    assert not mx.array_equal(latents, inpainting.image_latents)  # the masked part was repainted


def test_the_sampler_refuses_inputs_that_do_not_fit_the_unet():
    sampler, context, pooled = _sampler(9)
    with pytest.raises(InputError, match="this UNet takes 9 input channels: it is an inpainting model; give an image "
                                         "and a mask"):
        sampler.steps(context, pooled, num_inference_steps=2, height=SIZE, width=SIZE)
    with pytest.raises(InputError, match="this UNet takes 9 input channels and the inpainting gives it 4"):
        sampler.steps(context, pooled, inpainting=_inpainting(1, concatenated=False), strength=1.0)
    with pytest.raises(InputError, match="give it neither image_latents nor denoising_start"):
        sampler.steps(context, pooled, inpainting=_inpainting(1, concatenated=True), denoising_start=0.5)
    with pytest.raises(PipelineError, match="this UNet takes 6 input channels; inpainting needs an ordinary 4-channel "
                                            "UNet or an inpainting one of 9"):
        check_arguments(UNetConfig.from_preset("tiny", in_channels=6), np.ones((1, SIZE, SIZE)), (SIZE, SIZE), 1,
                        refined=False)
    with pytest.raises(InputError, match="inpainting runs without a refiner"):
        check_arguments(sampler.unet.config, np.ones((1, SIZE, SIZE)), (SIZE, SIZE), 1, refined=True)
