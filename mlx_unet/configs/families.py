"""The SD families by name, told apart by their widths: for messages that say which model, or
which model a file was made for, is which.

The UNet's cross-attention width is the text conditioning it was trained on, and differs
between every family; a text encoder's width names the CLIP it is.
"""

from __future__ import annotations

from .unet import UNetConfig

# Cross-attention width -> family.
UNET_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL base", 1280: "SDXL refiner"}
# Text encoder width -> which CLIP, and where it is used.
TEXT_ENCODER_FAMILIES = {
    768: "CLIP ViT-L (SD 1.x, SDXL's first text encoder)",
    1024: "OpenCLIP ViT-H (SD 2.x)",
    1280: "OpenCLIP ViT-bigG (SDXL's second text encoder)",
}
# SDXL's pooled text embedding width, which its added conditioning takes before the time ids.
SDXL_POOLED = 1280


def cross_attention_family(width: int) -> str:
    """The family whose UNet attends to ``width``-wide text: "SD 1.x (768-wide text)"."""
    return f"{UNET_FAMILIES.get(width, 'an SD-like model')} ({width}-wide text)"


def unet_family(config: UNetConfig) -> str:
    """The family a UNet config belongs to, for messages: "SDXL base (5 time ids)", "SD 1.x, inpainting"."""
    like = "SDXL-like" if config.has_text_time_embedding else "SD-like"
    family = UNET_FAMILIES.get(config.cross_attention_dim, f"{like} ({config.cross_attention_dim}-wide text)")
    time_ids = (config.projection_class_embeddings_input_dim or 0) - SDXL_POOLED
    if config.has_text_time_embedding and time_ids > 0:
        family = f"{family} ({time_ids // config.addition_time_embed_dim} time ids)"
    if config.in_channels == 9:
        family += ", inpainting"
    return family


def text_encoder_family(width: int) -> str:
    return TEXT_ENCODER_FAMILIES.get(width, f"a {width}-wide text encoder")
