"""AutoencoderTiny: diffusers' tiny VAE (madebyollin's TAESD for SD 1.x / 2.x and TAESDXL for
SDXL, distilled from their VAEs) in MLX, NHWC, driven by a TinyVAEConfig.

Plain 3x3 convolutions and ReLUs, with no normalisation or attention: a decode costs a small
fraction of AutoencoderKL's, which makes it the decoder for previews during sampling and for
fast drafts, at some loss of fine detail.

Images are (batch, height, width, 3) in [-1, 1], as AutoencoderKL's. Latents are the UNet's own:
TAESD was distilled on latents already scaled for the UNet, so its config's scaling_factor is 1
and the pipelines' ``latents / scaling_factor`` leaves them as they are.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..configs.vae import TinyVAEConfig
from ..errors import InputError
from .resnet import upsample_nearest


class Upsample(nn.Module):
    """DecoderTiny's ``nn.Upsample(scale_factor=2, mode="nearest")``: no parameters, a place in
    the layer list (which fixes the numbering of the parameters after it)."""

    def __call__(self, x: mx.array) -> mx.array:
        return upsample_nearest(x)


class AutoencoderTinyBlock(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> conv, plus the input, through a ReLU.

    diffusers' ``skip`` is a 1x1 convolution only where the block changes width, which no block
    of EncoderTiny or DecoderTiny does; elsewhere it is the identity, with no parameters."""

    def __init__(self, channels: int):
        super().__init__()
        # diffusers' Sequential, numbered alike: parameters at 0, 2 and 4.
        self.conv = [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                     nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                     nn.Conv2d(channels, channels, 3, padding=1)]

    def __call__(self, x: mx.array) -> mx.array:
        return nn.relu(_run(self.conv, x) + x)


def _run(layers: list[nn.Module], x: mx.array) -> mx.array:
    for layer in layers:
        x = layer(x)
    return x


class EncoderTiny(nn.Module):
    """Image -> latents. Level 0 is a convolution from the image's channels, each later level a
    stride-2 convolution without bias; each is followed by its blocks; a last convolution makes
    the latent channels."""

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        width = config.encoder_block_out_channels[0]  # one width throughout (TinyVAEConfig checks)
        layers: list[nn.Module] = []
        for level, blocks in enumerate(config.num_encoder_blocks):
            layers.append(nn.Conv2d(config.in_channels, width, 3, padding=1) if level == 0 else
                          nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False))
            layers += [AutoencoderTinyBlock(width) for _ in range(blocks)]
        layers.append(nn.Conv2d(width, config.latent_channels, 3, padding=1))
        self.layers = layers

    def __call__(self, images: mx.array) -> mx.array:
        # TAESD was trained on images in [0, 1]; diffusers hands it [-1, 1].
        return _run(self.layers, (images + 1) / 2)


class DecoderTiny(nn.Module):
    """Latents -> image. A convolution and a ReLU, then per level its blocks, a 2x upsampling
    (all levels but the last) and a convolution without bias (the last level's, with bias, makes
    the image's channels)."""

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        width = config.decoder_block_out_channels[0]
        levels = len(config.num_decoder_blocks)
        layers: list[nn.Module] = [nn.Conv2d(config.latent_channels, width, 3, padding=1), nn.ReLU()]
        for level, blocks in enumerate(config.num_decoder_blocks):
            last = level == levels - 1
            layers += [AutoencoderTinyBlock(width) for _ in range(blocks)]
            if not last:
                layers.append(Upsample())
            layers.append(nn.Conv2d(width, config.out_channels if last else width, 3, padding=1, bias=last))
        self.layers = layers

    def __call__(self, latents: mx.array) -> mx.array:
        # A soft clamp of the latents to (-3, 3), as TAESD was trained with; the image comes out
        # in [0, 1] (about) and is handed on in [-1, 1].
        x = mx.tanh(latents / 3) * 3
        return self.run_layers(x) * 2 - 1

    def run_layers(self, x: mx.array) -> mx.array:
        """The layers, one after another (the CPU kernels' decoder runs each upsampling together
        with the convolution after it)."""
        return _run(self.layers, x)


class AutoencoderTiny(nn.Module):
    """diffusers' AutoencoderTiny. Parameter names are diffusers' checkpoint names.

    ``encode(images)`` -> latents, ``decode(latents)`` -> images, both NHWC in the model's dtype.
    Unlike AutoencoderKL's, the encoder gives the latents themselves, not a distribution.
    """

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)

    @property
    def dtype(self) -> mx.Dtype:
        # A bias: the CPU kernels keep a half-precision model's convolution weights half and hold
        # the rest in float32, the dtype it then computes in (cpu/widen.py).
        return self.decoder.layers[0].bias.dtype

    def encode(self, images: mx.array) -> mx.array:
        """(B, H, W, in_channels) images in [-1, 1] -> (B, H/f, W/f, latent_channels) latents, f the
        config's ``downsample_factor`` (sizes not multiples of f round up, as diffusers')."""
        return self.encoder(self._check(images, "images", self.config.in_channels))

    def decode(self, latents: mx.array) -> mx.array:
        """(B, h, w, latent_channels) latents -> (B, f h, f w, out_channels) images in about [-1, 1],
        f the config's ``upsample_factor``."""
        return self.decoder(self._check(latents, "latents", self.config.latent_channels))

    def _check(self, x, name: str, channels: int) -> mx.array:
        """``x`` as NHWC floats of ``channels`` channels in the model's dtype, or one sentence on
        what it is instead."""
        if not isinstance(x, mx.array):
            raise InputError(f"{name} must be an mlx array, got {type(x).__name__}.")
        if x.ndim != 4 or x.shape[-1] != channels:
            nchw = x.ndim == 4 and x.shape[1] == channels
            hint = f"; it looks like NCHW, transpose it with {name}.transpose(0, 2, 3, 1)" if nchw else ""
            raise InputError(f"{name} must be (batch, height, width, {channels}) NHWC for this tiny VAE, got shape "
                             f"{tuple(x.shape)}{hint}.")
        if not mx.issubdtype(x.dtype, mx.floating):
            raise InputError(f"{name} must be floating point, got {x.dtype}.")
        return x.astype(self.dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: mx.Dtype | None = None,
                        cpu_kernels: bool | None = None) -> "AutoencoderTiny":
        """Load ``config.json`` and the MLX ``*.safetensors`` weights of a converted tiny VAE
        folder (``mlx-unet convert madebyollin/taesdxl OUT``). ``dtype`` None: the weights' own
        (TAESD runs in float16 as well). ``cpu_kernels``: as for ``AutoencoderKL.from_pretrained``."""
        from ..weights import load_pretrained

        folder = Path(folder)
        return load_pretrained(cls(TinyVAEConfig.from_json(folder)), folder, dtype, cpu_kernels)
