"""The numerical reference for the tiny VAE: diffusers' AutoencoderTiny built in this process,
and saved as a Hub snapshot of it would hold it."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from diffusers import AutoencoderTiny as TorchTinyVAE
from reference import init_every_parameter, mlx_weights
from test_convert import _hub_cache

from mlx_unet import AutoencoderTiny, TinyVAEConfig, cpu
from mlx_unet.weights import load_weights


def torch_tiny_vae(config: TinyVAEConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                   centred: bool = False) -> TorchTinyVAE:
    """diffusers' AutoencoderTiny with every parameter drawn from ``seed``, in ``dtype``.

    ``centred``: the last convolution halved and its bias raised by 0.5, the middle of the [0, 1]
    that TAESD's decoder ends in: random weights make images that a pipeline's clamp to [0, 1]
    flattens otherwise, hiding differences in them."""
    model = TorchTinyVAE(**{k: v for k, v in config.to_diffusers_dict().items() if not k.startswith("_")})
    init_every_parameter(model, seed)
    if centred:
        with torch.no_grad():
            model.decoder.layers[-1].weight.mul_(0.5)
            model.decoder.layers[-1].bias.mul_(0.5).add_(0.5)
    return model.to(dtype).eval()


def mlx_tiny_vae_from_torch(model: TorchTinyVAE, config: TinyVAEConfig, dtype=mx.float32) -> AutoencoderTiny:
    """Ours with ``model``'s weights (copied), on the test's code path (see conftest's code_path)."""
    ours = AutoencoderTiny(config)
    load_weights(ours, mlx_weights({k: v.float() for k, v in model.state_dict().items()}, dtype))
    return cpu.prepare(ours)


@torch.no_grad()
def torch_tiny_encode(model: TorchTinyVAE, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(model.dtype)
    return model.encode(x).latents.float().permute(0, 2, 3, 1).numpy()


def hub_snapshot(model: TorchTinyVAE, root: Path, repo: str) -> Path:
    """A Hugging Face cache under ``root`` holding ``repo``: ``model`` as diffusers saves it
    (config.json + diffusion_pytorch_model.safetensors), as madebyollin/taesd(xl) hold it."""
    saved = root / "saved"
    model.save_pretrained(saved)
    return _hub_cache(root / "hub", repo, {p.name: p for p in saved.iterdir()})
