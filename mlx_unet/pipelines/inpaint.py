"""Inpainting: the white part of a mask repainted, the rest of the image kept, as diffusers'
StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline do it.

Two kinds of model:

- inpainting UNets (9 input channels: SD 1.5 / 2.x inpainting, SDXL inpainting) see the mask and
  the masked image at every step: their input is the latents, the mask at latent size and the
  masked image's latents, side by side along the channels;
- ordinary UNets (4 channels) never see them: after every step the known region (outside the
  mask) is put back, the image's latents noised to the level of the next step ("legacy"
  inpainting).

The mask is binarised at 0.5 (uint8 at 128, as a PNG mask read by diffusers is), resized to the
latent size by nearest neighbour (torch's default ``interpolate``: every 8th pixel), and the
masked image is the image in [-1, 1] with the repainted region at 0 (grey).

``prepare`` makes an ``Inpainting`` from the user's image and mask; the sampler takes it
(``Sampler.steps(..., inpainting=...)``): ``extra_channels`` for a 9-channel UNet's input,
``start`` for the first latents and ``known_region`` for a 4-channel UNet's blend.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import InputError, PipelineError
from ..models.vae import AutoencoderKL
from .arguments import PIXELS_PER_LATENT, check_finite_array

MASK_CHANNELS = 1  # a 9-channel UNet takes 4 latent + 1 mask + 4 masked-image channels


@dataclass(frozen=True)
class KnownRegion:
    """A 4-channel UNet's inpainting: what every step puts back outside the mask."""

    mask: mx.array  # (B, h, w, 1) in {0, 1}; 1 = repaint
    image_latents: mx.array  # (B, h, w, 4): the image's scaled latents
    noise: mx.array  # the run's starting noise, which also noises the known region

    def blend(self, scheduler, latents: mx.array, next_timestep: mx.array) -> mx.array:
        """``latents`` after a step, with the known region replaced by the image's latents noised
        to ``next_timestep`` (an empty array after the last step: the image's latents as they
        are). The scheduler's step index has moved on by then; diffusers' ``add_noise`` reads
        its sigma from that index, as ours does."""
        known = self.image_latents
        if next_timestep.size:
            known = scheduler.add_noise(known, self.noise, next_timestep)
        return (1 - self.mask) * known + self.mask * latents


@dataclass(frozen=True)
class Inpainting:
    """What inpainting adds to a run of ``batch`` images, all float32 at latent size (h, w)."""

    mask: mx.array  # (B, h, w, 1) in {0, 1}; 1 = repaint
    image_latents: mx.array | None  # (B, h, w, 4); None where unused (a 9-channel UNet at strength 1)
    masked_image_latents: mx.array | None  # (B, h, w, 4) for a 9-channel UNet; None for a 4-channel one

    def extra_channels(self, guided: bool) -> mx.array | None:
        """What a 9-channel UNet takes after the latents at every step, (B or 2B, h, w, 5); the
        same for both halves of classifier-free guidance. None for a 4-channel UNet."""
        if self.masked_image_latents is None:
            return None
        extra = mx.concatenate([self.mask, self.masked_image_latents], axis=-1)
        return mx.concatenate([extra, extra]) if guided else extra

    def start(self, scheduler, noise: mx.array, first_timestep: mx.array, strength: float) -> mx.array:
        """The first latents: at strength 1, pure noise scaled as for text-to-image (diffusers'
        ``is_strength_max``: not the image noised to the first timestep, which differs in scale);
        below it, the image's latents noised to the first timestep, as img2img starts."""
        if strength == 1.0:
            return noise * scheduler.init_noise_sigma
        return scheduler.add_noise(self.image_latents, noise, first_timestep)

    def known_region(self, noise: mx.array) -> KnownRegion | None:
        """The blend a 4-channel UNet's steps need (None for a 9-channel UNet, which sees the mask)."""
        if self.masked_image_latents is not None:
            return None
        return KnownRegion(self.mask, self.image_latents, noise)


def check_unet(config, inpainting: Inpainting | None) -> None:
    """Refuse a run whose input channels do not add up to the UNet's (``config``): an
    inpainting UNet without a mask, or an ``Inpainting`` made for the other kind of UNet."""
    extra = 0 if inpainting is None or inpainting.masked_image_latents is None else \
        MASK_CHANNELS + inpainting.masked_image_latents.shape[-1]
    if config.out_channels + extra == config.in_channels:
        return
    if inpainting is None:
        raise InputError(f"this UNet takes {config.in_channels} input channels: it is an inpainting model; give "
                         "an image and a mask to repaint.")
    raise InputError(f"this UNet takes {config.in_channels} input channels and the inpainting gives it "
                     f"{config.out_channels + extra}; prepare it for this UNet (pipelines.inpaint.prepare).")


def prepare(vae: AutoencoderKL, unet_in_channels: int, image: np.ndarray | mx.array,
            mask_image: np.ndarray | mx.array, batch: int, strength: float, seed: int | None) -> Inpainting:
    """The ``Inpainting`` of ``batch`` images from ``image`` (1 or ``batch``, H, W, 3; uint8, or
    floats in [0, 1]; checked by the pipeline) and ``mask_image`` (1 or ``batch``, H, W[, 1]; uint8, bool or floats in
    [0, 1]; white = repaint), for a UNet of ``unet_in_channels``. The VAE encodes what the model
    needs, as diffusers does: the image (a 4-channel UNet's known region, or the start below
    strength 1) and then the masked image (a 9-channel UNet's input), each a draw from the latent
    distribution, with keys from ``seed``."""
    latent_channels = vae.config.latent_channels
    concatenated = unet_in_channels == 2 * latent_channels + MASK_CHANNELS
    if not concatenated and unet_in_channels != latent_channels:
        raise PipelineError(f"this UNet takes {unet_in_channels} input channels; inpainting needs an ordinary "
                            f"{latent_channels}-channel UNet or an inpainting one of "
                            f"{2 * latent_channels + MASK_CHANNELS}.")
    check_mask(mask_image, tuple(image.shape[1:3]), batch)
    mask = binary_mask(mask_image)
    pixels = to_pixels(image)
    image_key, masked_key = (None, None) if seed is None else mx.random.split(mx.random.key(seed), 4)[2:]
    image_latents = masked_image_latents = None
    if not concatenated or strength < 1.0:
        image_latents = encode(vae, pixels, image_key)
    if concatenated:
        masked_image_latents = encode(vae, pixels * (mask < 0.5), masked_key)
    return Inpainting(_batched(latent_mask(mask), batch), _batched(image_latents, batch),
                      _batched(masked_image_latents, batch))


def check_mask(mask_image, size: tuple[int, int], batch: int) -> None:
    """Refuse a mask that is not (1 or ``batch``, H, W[, 1]) of the image's ``size`` = (H, W),
    or whose values are not uint8, bool or floats in [0, 1]."""
    if not isinstance(mask_image, (np.ndarray, mx.array)):
        raise InputError(f"mask_image must be a numpy or MLX array (B, H, W), got {type(mask_image).__name__}.")
    shape = tuple(mask_image.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1)) or shape[0] not in (1, batch):
        raise PipelineError(f"mask_image must be (1 or {batch}, height, width) or (1 or {batch}, height, width, 1), "
                            f"one grey level per pixel, got shape {shape}.")
    if shape[1:3] != tuple(size):
        raise PipelineError(f"mask_image is {shape[1]}x{shape[2]} and the image {size[0]}x{size[1]}; give a mask "
                            "of the image's size.")
    _check_unit_values("mask_image", mask_image)


def binary_mask(mask_image: np.ndarray | mx.array) -> mx.array:
    """A checked mask binarised as diffusers' mask processor does (>= 0.5 is 1, after uint8 / 255):
    (1 or B, H, W, 1) float32."""
    mask = to_unit(mask_image)
    if mask.ndim == 3:
        mask = mask[..., None]
    return (mask >= 0.5).astype(mx.float32)


def latent_mask(mask: mx.array) -> mx.array:
    """A pixel mask (B, H, W, 1) at latent size: torch's default (nearest) ``interpolate`` to
    (H/8, W/8) takes source pixel floor(i * 8) = 8i, the top-left one of each 8x8 block."""
    return mask[:, ::PIXELS_PER_LATENT, ::PIXELS_PER_LATENT, :]


def to_unit(values: np.ndarray | mx.array) -> mx.array:
    """An image or mask as float32 in [0, 1]: uint8 / 255 (as diffusers reads a PNG), else as given."""
    values = mx.array(values) if isinstance(values, np.ndarray) else values
    return values.astype(mx.float32) / 255 if values.dtype == mx.uint8 else values.astype(mx.float32)


def to_pixels(image: np.ndarray | mx.array) -> mx.array:
    """An image as the VAE takes it: float32 in [-1, 1]."""
    return to_unit(image) * 2 - 1


def encode(vae: AutoencoderKL, pixels: mx.array, key: mx.array | None) -> mx.array:
    """Pixels in [-1, 1] -> the VAE's scaled latents, a draw from its latent distribution (with
    ``key``), as diffusers' ``retrieve_latents`` samples it."""
    latents = vae.encode(pixels.astype(vae.dtype)).sample(key).astype(mx.float32)
    return latents * vae.config.scaling_factor


def _check_unit_values(name: str, values) -> None:
    array = mx.array(values) if isinstance(values, np.ndarray) else values
    if array.dtype in (mx.uint8, mx.bool_):
        return
    check_finite_array(name, array)
    if mx.any((array < 0) | (array > 1)).item():
        raise InputError(f"{name} holds values outside [0, 1]; pass uint8 pixels or floats in [0, 1].")


def _batched(array: mx.array | None, batch: int) -> mx.array | None:
    """One image's array shared by ``batch`` images (diffusers repeats it along the batch)."""
    if array is None or array.shape[0] == batch:
        return array
    return mx.broadcast_to(array, (batch, *array.shape[1:]))
