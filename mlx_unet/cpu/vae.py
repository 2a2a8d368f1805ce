"""The VAEs' encoders and decoders on the CPU: each evaluated where its large buffers are reused.

A decode at 512 px and more passes activations of 100 MiB to 1 GiB from layer to layer (the tiny
VAE's 64 channels at full size: 64 MiB each at 512 px), which MLX's CPU backend takes from malloc
and gives back one by one (``heap``). These take the places of ``models.vae.Encoder`` and
``Decoder`` and of ``models.tiny_vae.EncoderTiny`` and ``DecoderTiny`` with the same children and
forward, and evaluate their output inside ``heap.reused_heap()``, so that the decode (or one tile
of a tiled decode) allocates its working memory once. Evaluating there, rather than when the
caller reads the result, is what a decode does next anyway.
"""

import mlx.core as mx

from ..models import tiny_vae, vae
from .containers import adopted
from .heap import reused_heap
from .upsample import fuses, upsampled_and_convolved


def _evaluated_in_reused_heap(forward, x: mx.array) -> mx.array:
    with reused_heap():
        out = forward(x)
        mx.eval(out)
    return out


class _InReusedHeap:
    """Put before a plain encoder or decoder class among a CPU version's bases: that class's
    forward, evaluated in a reused heap."""

    from_module = classmethod(adopted)

    def __call__(self, x: mx.array) -> mx.array:
        return _evaluated_in_reused_heap(super().__call__, x)


class Encoder(_InReusedHeap, vae.Encoder):
    """Takes the place of ``models.vae.Encoder``."""


class Decoder(_InReusedHeap, vae.Decoder):
    """Takes the place of ``models.vae.Decoder``."""


class EncoderTiny(_InReusedHeap, tiny_vae.EncoderTiny):
    """Takes the place of ``models.tiny_vae.EncoderTiny``."""


class DecoderTiny(_InReusedHeap, tiny_vae.DecoderTiny):
    """Takes the place of ``models.tiny_vae.DecoderTiny``. Each 2x upsampling and the convolution
    listed after it run as one step (``upsample.py``): 0.44x the multiply-adds, and the upsampled
    image is never made."""

    def run_layers(self, x: mx.array) -> mx.array:
        layers, i = self.layers, 0
        while i < len(layers):
            if isinstance(layers[i], tiny_vae.Upsample) and i + 1 < len(layers) and fuses(layers[i + 1]):
                x, i = upsampled_and_convolved(layers[i + 1], x), i + 2
            else:
                x, i = layers[i](x), i + 1
        return x
