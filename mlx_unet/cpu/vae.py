"""The VAE's encoder and decoder on the CPU: each evaluated where its large buffers are reused.

A decode at 512 px and more passes activations of 100 MiB to 1 GiB from layer to layer, which
MLX's CPU backend takes from malloc and gives back one by one (``heap``). These take the places of
``models.vae.Encoder`` and ``Decoder`` with the same children and forward, and evaluate their
output inside ``heap.reused_heap()``, so that the decode (or one tile of a tiled decode) allocates
its working memory once. Evaluating there, rather than when the caller reads the result, is what
a decode does next anyway.
"""

import mlx.core as mx

from ..models import vae
from .containers import adopted
from .heap import reused_heap


def _evaluated_in_reused_heap(forward, x: mx.array) -> mx.array:
    with reused_heap():
        out = forward(x)
        mx.eval(out)
    return out


class Encoder(vae.Encoder):
    """Takes the place of ``models.vae.Encoder``."""

    from_module = classmethod(adopted)

    def __call__(self, x: mx.array) -> mx.array:
        return _evaluated_in_reused_heap(super().__call__, x)


class Decoder(vae.Decoder):
    """Takes the place of ``models.vae.Decoder``."""

    from_module = classmethod(adopted)

    def __call__(self, z: mx.array) -> mx.array:
        return _evaluated_in_reused_heap(super().__call__, z)
