"""What the image parity tests share: the prompt, starting latents, how two images are compared,
and the random draws both sides of a run make, made the same."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from pipeline_files import SIZE

PROMPT = "a photo of an astronaut riding a horse, 35mm"


def noise_latents(batch: int, seed: int = 0) -> np.ndarray:
    """Starting noise (B, h, w, 4) for SIZE-pixel images."""
    return np.random.default_rng(seed).standard_normal((batch, SIZE // 8, SIZE // 8, 4), dtype=np.float32)


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def compare_images(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Image by image: a bad image must not hide behind a good one."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    for item, (mine, their) in enumerate(zip(ours, theirs)):
        error = float(np.abs(mine.astype(np.float64) - their).max())
        off = np.abs((mine * 255).round().astype(np.int16) - (their * 255).round().astype(np.int16))
        print(f"image {item}: max abs error {error:.2e}; uint8 max diff {off.max()}, "
              f"{np.mean(off > 0):.4%} of values differ")
        # The image is varied (not a flat clamp), so agreement means something.
        assert their.std() > 0.05 and np.mean((their > 0) & (their < 1)) > 0.5
        assert error <= 1e-3
        assert off.max() <= 1 and np.mean(off > 0) < 0.01


def same_img2img_draws(monkeypatch, their_pipeline_module, seed: int) -> np.ndarray:
    """An img2img run's draws made the same on both sides: the VAE's (``SharedDraws``) and the
    start noise diffusers' pipeline module draws, which is returned for our ``latents``."""
    SharedDraws(seed).install(monkeypatch)
    start = noise_latents(1, seed=seed + 1)
    monkeypatch.setattr(their_pipeline_module, "randn_tensor", lambda *a, **k: nchw(start))
    return start


class SharedDraws:
    """The VAE's latent-distribution draws, the same on both sides in call order: the n-th draw
    diffusers makes (its ``randn_tensor``, NCHW) holds the values of our n-th
    (``DiagonalGaussian.sample``, NHWC). ``install`` patches both."""

    def __init__(self, seed: int):
        self.seed = seed
        self.theirs = self.ours = 0  # draws made so far

    def _values(self, index: int, nhwc: tuple[int, ...]) -> np.ndarray:
        return np.random.default_rng((self.seed, index)).standard_normal(nhwc, dtype=np.float32)

    def install(self, monkeypatch) -> SharedDraws:
        from diffusers.models.autoencoders import vae as their_vae

        from mlx_unet.models.vae import DiagonalGaussian

        def theirs(shape, *args, **kwargs):
            b, c, h, w = shape
            values = self._values(self.theirs, (b, h, w, c))
            self.theirs += 1
            return torch.from_numpy(values).permute(0, 3, 1, 2).contiguous()

        def ours(gaussian, key=None):
            values = self._values(self.ours, gaussian.mean.shape)
            self.ours += 1
            return gaussian.mean + gaussian.std * mx.array(values)

        monkeypatch.setattr(their_vae, "randn_tensor", theirs)
        monkeypatch.setattr(DiagonalGaussian, "sample", ours)
        return self
