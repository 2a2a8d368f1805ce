"""Tiny random inpainting pipelines on disk, and the random draws both sides of a parity test share.

Each family's ordinary pipeline (``pipeline_files``, ``sd_pipeline_files``) is saved and
converted as it is (a 4-channel UNet: diffusers' inpainting pipelines blend the known region
back), and again with a 9-channel inpainting UNet of the same family in diffusers' inpainting
pipeline class, as the Hub's inpainting checkpoints are saved.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
from pipeline_files import diffusers_pipeline
from reference import tiny_config, torch_unet
from sd_pipeline_files import sd_pipeline

from mlx_unet.convert import convert

INPAINTING = {
    "sdxl": (StableDiffusionXLInpaintPipeline, "sdxl-inpaint"),
    "sd1": (StableDiffusionInpaintPipeline, "sd15-inpaint"),
}


def inpainting_pipelines(tmp: Path, family: str, dtype: str = "float32") -> dict:
    """A family's ("sdxl" or "sd1") tiny pipelines, each as a diffusers inpainting pipeline and
    converted by us: ``legacy`` / ``mlx_legacy`` with the ordinary 4-channel UNet, ``inpaint`` /
    ``mlx_inpaint`` with a 9-channel one (the other components the same)."""
    if family == "sdxl":
        plain, folder = diffusers_pipeline(tmp, refiner=False)
    else:
        plain, folder = sd_pipeline(tmp, family)
    cls, unet_family = INPAINTING[family]
    legacy = cls(**plain.components)
    inpaint = cls(**{**plain.components, "unet": torch_unet(tiny_config(unet_family), seed=150)})
    inpaint_folder = tmp / f"diffusers-{family}-inpaint"
    inpaint.save_pretrained(inpaint_folder)
    convert(folder, tmp / "mlx-legacy", dtype=dtype, progress=False)
    convert(inpaint_folder, tmp / "mlx-inpaint", dtype=dtype, progress=False)
    for pipe in (legacy, inpaint):
        pipe.set_progress_bar_config(disable=True)
    return {"legacy": legacy, "inpaint": inpaint, "mlx_legacy": tmp / "mlx-legacy", "mlx_inpaint": tmp / "mlx-inpaint"}


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
