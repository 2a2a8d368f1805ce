"""The numerical reference for the VAE: diffusers' AutoencoderKL built in this process."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from diffusers import AutoencoderKL as TorchVAE
from reference import init_every_parameter, mlx_weights

from mlx_unet import AutoencoderKL, VAEConfig, cpu
from mlx_unet.weights import load_weights


def torch_vae(config: VAEConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> TorchVAE:
    """diffusers' AutoencoderKL with every parameter drawn from ``seed``; allocated once, in ``dtype``."""
    with torch.device("meta"):
        model = TorchVAE(**config.to_diffusers_dict())
    model = model.to_empty(device="cpu")
    if dtype != torch.float32:
        model = model.to(dtype)
    init_every_parameter(model, seed)
    return model.eval()


def mlx_vae_from_torch(model: TorchVAE, config: VAEConfig, dtype=mx.float32) -> AutoencoderKL:
    """Our VAE with ``model``'s weights (copied)."""
    ours = AutoencoderKL(config)
    load_weights(ours, mlx_weights(model.state_dict(), dtype))
    return cpu.prepare(ours)


@torch.no_grad()
def torch_decode(model: TorchVAE, latents: np.ndarray) -> np.ndarray:
    """NHWC float32 latents in, NHWC float32 images out (the model's own dtype in between)."""
    z = torch.from_numpy(latents).permute(0, 3, 1, 2).to(model.dtype)
    return model.decode(z).sample.float().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def torch_encode(model: TorchVAE, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NHWC images in; the posterior's (mean, logvar), NHWC float32."""
    posterior = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2).to(model.dtype)).latent_dist
    return tuple(t.float().permute(0, 2, 3, 1).numpy() for t in (posterior.mean, posterior.logvar))


def to_numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))
