"""SD 1.x and 2.x (and their inpainting models): diffusers' StableDiffusion[Img2Img|Inpaint]Pipeline.

One text encoder: CLIP ViT-L for 1.x, OpenCLIP ViT-H for 2.x (as diffusers lays it out: a
CLIPTextModel of 23 layers, SD 2 conditioning on the penultimate one of the original 24). The
prediction type (epsilon, or v for SD 2.x 768) is the scheduler config's.
"""

from __future__ import annotations

import mlx.core as mx

from .diffusion import DiffusionPipeline


class SDPipeline(DiffusionPipeline):
    """``SDPipeline.from_pretrained(folder)(prompt)`` -> uint8 images (B, H, W, 3)."""

    def _encode(self, prompts: list[str], prompts_2: list[str], clip_skip: int | None):
        """The last layer's states final-normed, as the UNet was trained on; ``clip_skip``
        takes them that many layers earlier, final-normed too (diffusers' rule, unlike SDXL's)."""
        tokenizer, encoder = self.tokenizers[0], self._text_encoders()[0]
        hidden, _ = encoder(mx.array(tokenizer(prompts)), hidden_layer=-1 - (clip_skip or 0))
        return encoder.text_model.final_layer_norm(hidden), None
