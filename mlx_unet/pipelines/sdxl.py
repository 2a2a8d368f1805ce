"""SDXL (base, refiner, inpainting): diffusers' StableDiffusionXL[Img2Img|Inpaint]Pipeline."""

from __future__ import annotations

import mlx.core as mx

from .diffusion import DiffusionPipeline
from .prompts import PromptTokens, encode_chunks


class SDXLPipeline(DiffusionPipeline):
    """``SDXLPipeline.from_pretrained(folder)(prompt)`` -> uint8 images (B, H, W, 3); a base
    pipeline takes a refiner pipeline as ``refiner=``."""

    def _encode(self, tokens: list[PromptTokens | None], clip_skip: int | None):
        """Each encoder's hidden states before the last layer (``clip_skip`` layers earlier
        still), not final-normed, concatenated along the features. The pooled embedding is the
        projected one of the encoder with a projection (the second): diffusers takes the first
        2-D output, and the first encoder's output 0 is 3-D.

        Prompt weights apply to each encoder's states before they are concatenated, each scaled
        back to its own mean: A1111 wraps SDXL's two encoders each in its own weighting."""
        layer = -2 if clip_skip is None else -(clip_skip + 2)
        states, pooled = [], None
        for chunks, encoder in zip(tokens, self._text_encoders()):
            if encoder is None:  # a refiner has the second only
                continue
            hidden, pooled_out = encode_chunks(encoder, chunks, layer)
            states.append(hidden)
            if encoder.config.with_projection:
                pooled = pooled_out
        context = mx.concatenate(states, axis=-1) if len(states) > 1 else states[0]
        return context, pooled
