"""Tiny random inpainting pipelines on disk.

Each family's ordinary pipeline (``pipeline_files``, ``sd_pipeline_files``) is saved and
converted as it is (a 4-channel UNet: diffusers' inpainting pipelines blend the known region
back), and again with a 9-channel inpainting UNet of the same family in diffusers' inpainting
pipeline class, as the Hub's inpainting checkpoints are saved.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
from pipeline_files import diffusers_pipeline
from reference import tiny_config, torch_unet
from sd_image_pipelines import sd_pipeline

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
