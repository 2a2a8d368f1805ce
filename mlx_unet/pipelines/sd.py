"""SD 1.x and 2.x (and their inpainting models): diffusers' StableDiffusion[Img2Img|Inpaint]Pipeline.

One text encoder: CLIP ViT-L for 1.x, OpenCLIP ViT-H for 2.x (as diffusers lays it out: a
CLIPTextModel of 23 layers, SD 2 conditioning on the penultimate one of the original 24). The
prediction type (epsilon, or v for SD 2.x 768) is the scheduler config's.
"""

from __future__ import annotations

from .diffusion import DiffusionPipeline
from .prompts import PromptTokens, encode_chunks


class SDPipeline(DiffusionPipeline):
    """``SDPipeline.from_pretrained(folder)(prompt)`` -> uint8 images (B, H, W, 3)."""

    def _encode(self, tokens: list[PromptTokens | None], clip_skip: int | None):
        """The last layer's states final-normed, as the UNet was trained on; ``clip_skip``
        takes them that many layers earlier, final-normed too (diffusers' rule, unlike SDXL's).
        Prompt weights apply to the final-normed states, as in A1111."""
        encoder = self._text_encoders()[0]
        context, _ = encode_chunks(encoder, tokens[0], -1 - (clip_skip or 0), encoder.text_model.final_layer_norm)
        return context, None
