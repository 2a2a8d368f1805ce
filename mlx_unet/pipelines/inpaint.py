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
from .arguments import PIXELS_PER_LATENT
from .pixels import batched, check_unit_values, encode, to_pixels, to_unit

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

    @property
    def extra_channel_count(self) -> int:
        return 0 if self.masked_image_latents is None else MASK_CHANNELS + self.masked_image_latents.shape[-1]

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


def check_arguments(unet_config, mask_image, size: tuple[int, int] | None, batch: int, refined: bool) -> None:
    """A pipeline call's inpainting arguments, before any work: the mask for ``batch`` images of
    the image's ``size``, a UNet that can inpaint, no refiner; and no inpainting UNet without a mask."""
    if mask_image is None:
        check_unet(unet_config, None)
        return
    if refined:
        raise InputError("inpainting runs without a refiner; leave refiner out, or refine the result in a second "
                         "img2img run.")
    concatenates(unet_config)
    check_mask(mask_image, size, batch)


def concatenates(unet_config) -> bool:
    """Whether the UNet is an inpainting one (the mask and masked image concatenated to its
    input) rather than an ordinary one (the known region blended back); neither is refused."""
    latent, given = unet_config.out_channels, unet_config.in_channels
    if given not in (latent, 2 * latent + MASK_CHANNELS):
        raise PipelineError(f"this UNet takes {given} input channels; inpainting needs an ordinary {latent}-channel "
                            f"UNet or an inpainting one of {2 * latent + MASK_CHANNELS}.")
    return given != latent


def check_unet(unet_config, inpainting: Inpainting | None) -> None:
    """Refuse a run whose input channels do not add up to the UNet's: an inpainting UNet
    without a mask, or an ``Inpainting`` made for the other kind of UNet."""
    extra = 0 if inpainting is None else inpainting.extra_channel_count
    if unet_config.out_channels + extra == unet_config.in_channels:
        return
    if inpainting is None:
        raise InputError(f"this UNet takes {unet_config.in_channels} input channels: it is an inpainting model; give "
                         "an image and a mask to repaint.")
    raise InputError(f"this UNet takes {unet_config.in_channels} input channels and the inpainting gives it "
                     f"{unet_config.out_channels + extra}; prepare it for this UNet (pipelines.inpaint.prepare).")


def prepare(vae: AutoencoderKL, unet_config, image: np.ndarray | mx.array, mask_image: np.ndarray | mx.array,
            batch: int, strength: float, seed: int | None) -> Inpainting:
    """The ``Inpainting`` of ``batch`` images from ``image`` (1 or ``batch``, H, W, 3; uint8, or
    floats in [0, 1]; checked by the pipeline) and ``mask_image`` (1 or ``batch``, H, W[, 1];
    uint8, bool or floats in [0, 1]; white = repaint), for the UNet of ``unet_config``. The VAE
    encodes what that UNet needs, in diffusers' order: the image (a 4-channel UNet's known
    region, or the start below strength 1), then the masked image (a 9-channel UNet's input),
    each a draw from the latent distribution, with keys from ``seed``."""
    concatenated = concatenates(unet_config)
    check_mask(mask_image, tuple(image.shape[1:3]), batch)
    mask = binary_mask(mask_image)
    pixels = to_pixels(image)
    # Keys apart from the ones Sampler splits from the same seed for its noise.
    image_key, masked_key = (None, None) if seed is None else mx.random.split(mx.random.key(seed), 4)[2:]
    image_latents = masked_image_latents = None
    if not concatenated or strength < 1.0:
        image_latents = encode(vae, pixels, image_key)
    if concatenated:
        masked_image_latents = encode(vae, pixels * (mask < 0.5), masked_key)
    return Inpainting(batched(latent_mask(mask), batch), batched(image_latents, batch),
                      batched(masked_image_latents, batch))


def check_mask(mask_image, size: tuple[int, int], batch: int) -> None:
    """Refuse a mask that is not (1 or ``batch``, H, W[, 1]) of the image's ``size`` = (H, W),
    or whose values are not uint8, bool or floats in [0, 1]."""
    if not isinstance(mask_image, (np.ndarray, mx.array)):
        raise InputError(f"mask_image must be a numpy or MLX array (B, H, W), got {type(mask_image).__name__}.")
    shape = tuple(mask_image.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1)) or shape[0] not in (1, batch):
        count = "1" if batch == 1 else f"1 or {batch}"
        raise PipelineError(f"mask_image must be ({count}, height, width) or ({count}, height, width, 1), one grey "
                            f"level per pixel, got shape {shape}.")
    if shape[1:3] != tuple(size):
        raise PipelineError(f"mask_image is {shape[1]}x{shape[2]} and the image {size[0]}x{size[1]}; give a mask "
                            "of the image's size.")
    check_unit_values("mask_image", mask_image)


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
