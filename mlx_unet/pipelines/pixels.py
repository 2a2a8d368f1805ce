"""Images and masks as the pipelines take them (arrays: uint8, or floats in [0, 1] as diffusers
takes them), checked; their latents, drawn from the VAE's latent distribution; and latents
decoded back to images."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import InputError, PipelineError
from ..models.vae import AutoencoderKL
from .arguments import PIXELS_PER_LATENT, check_finite_array


def checked_image(image, batch: int) -> tuple[int, int]:
    """An input image's (height, width), after checking its shape and values: (1 or ``batch``, H, W, 3)."""
    if not isinstance(image, (np.ndarray, mx.array)):
        raise InputError(f"image must be a numpy or MLX array (B, H, W, 3), got {type(image).__name__}.")
    if image.ndim != 4 or image.shape[-1] != 3 or image.shape[0] not in (1, batch):
        raise PipelineError(f"image must be (1 or {batch}, height, width, 3) RGB, got shape {tuple(image.shape)}.")
    if image.shape[1] % PIXELS_PER_LATENT or image.shape[2] % PIXELS_PER_LATENT:
        raise PipelineError(f"image height and width must be multiples of 8, got {image.shape[1]}x{image.shape[2]}.")
    check_unit_values("image", image)
    return image.shape[1], image.shape[2]


def check_unit_values(name: str, values) -> None:
    """uint8 and bool take any value; floats must be finite and in [0, 1]."""
    array = mx.array(values) if isinstance(values, np.ndarray) else values
    if array.dtype in (mx.uint8, mx.bool_):
        return
    check_finite_array(name, array)
    if mx.any((array < 0) | (array > 1)).item():
        raise InputError(f"{name} holds values outside [0, 1]; pass uint8 pixels or floats in [0, 1].")


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


def decode(vae, latents: mx.array, as_uint8: bool = True) -> np.ndarray:
    """Scaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3) by ``vae`` (an AutoencoderKL or
    AutoencoderTiny): uint8, or floats in [0, 1]."""
    images = vae.decode((latents / vae.config.scaling_factor).astype(vae.dtype))
    # diffusers' postprocessing: [-1, 1] -> [0, 1], clamped, in float32, then x255 rounded.
    images = np.array(mx.clip(images.astype(mx.float32) / 2 + 0.5, 0.0, 1.0))
    images = np.nan_to_num(images)  # NaN latents (warned of per step) decode to black, without a second warning
    return (images * 255).round().astype(np.uint8) if as_uint8 else images


def batched(array: mx.array | None, batch: int) -> mx.array | None:
    """One image's array shared by ``batch`` images (diffusers repeats it along the batch)."""
    if array is None or array.shape[0] == batch:
        return array
    return mx.broadcast_to(array, (batch, *array.shape[1:]))
