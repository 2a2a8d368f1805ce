"""Whether a pipeline's models fit together, from their configs alone: the converter checks it
before writing a folder, the pipeline before loading one."""

from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError
from .clip import CLIPTextConfig
from .unet import UNetConfig
from .vae import VAEConfig


def check_components_fit(unet: UNetConfig, encoders: Sequence[CLIPTextConfig], vae: VAEConfig) -> None:
    """Token states (the encoders' side by side), pooled embedding and latents must match the UNet."""
    if not encoders:
        raise ConfigError("the pipeline has no text encoder; the UNet needs one to condition on the prompt.")
    width = sum(c.hidden_size for c in encoders)
    if width != unet.cross_attention_dim:
        raise ConfigError(
            f"the text encoders give {' + '.join(str(c.hidden_size) for c in encoders)}-wide token states but the "
            f"UNet's cross-attention takes {unet.cross_attention_dim}; these models do not belong together."
        )
    if unet.has_text_time_embedding:
        pooled = encoders[-1].projection_dim if encoders[-1].with_projection else encoders[-1].hidden_size
        ids, remainder = divmod(unet.projection_class_embeddings_input_dim - pooled, unet.addition_time_embed_dim)
        if remainder or ids <= 0:
            raise ConfigError(
                f"the second text encoder's pooled embedding is {pooled} wide, which does not fit the UNet's added "
                f"embedding ({unet.projection_class_embeddings_input_dim} = pooled + time ids x "
                f"{unet.addition_time_embed_dim}); these models do not belong together."
            )
    if vae.latent_channels != unet.out_channels:
        raise ConfigError(
            f"the VAE has {vae.latent_channels} latent channels but the UNet predicts {unet.out_channels}; "
            "these models do not belong together."
        )
