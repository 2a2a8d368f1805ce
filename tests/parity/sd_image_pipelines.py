"""Tiny random SD 1.x and SD 2.x pipelines to make images with: diffusers' StableDiffusionPipeline
of small random components, saved, and converted whole by our converter.

SD 1.x: CLIP ViT-L's layout (quick_gelu, pads with end-of-text), epsilon prediction, DDIM as
runwayml's scheduler config has it. SD 2.x: OpenCLIP ViT-H's as diffusers lays it out (gelu,
pads with "!"), v-prediction, Euler, linear attention projections and head counts per level.
(``sd_pipeline_files`` builds the families' published schedulers, PNDM among them, for the
conversion tests; a run compares samplers both sides have.) The VAE's output is kept mostly
inside [-1, 1] (``pipeline_files.tiny_vae``), so the images compared are not clamped flat.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from pipeline_files import text_encoder, tiny_vae
from reference import tiny_config, torch_unet
from tokenizer_files import write_clip_tokenizer
from transformers import CLIPTextModel, CLIPTokenizer

from mlx_unet.convert import convert
from mlx_unet.convert.published import PUBLISHED

# The published SD 1.5 and SD 2.1 schedules (SD 2.1's with v-prediction), run by DDIM and Euler.
FAMILIES = {
    "sd1": dict(unet="sd15", width=24, act="quick_gelu", pad="<|endoftext|>",
                scheduler=lambda: DDIMScheduler.from_config(PUBLISHED[(768, False)].scheduler)),
    "sd2": dict(unet="sd2", width=40, act="gelu", pad="!",
                scheduler=lambda: EulerDiscreteScheduler.from_config(PUBLISHED[(1024, False)].scheduler)),
}


def sd_pipeline(tmp: Path, family: str, seed: int = 100) -> tuple[StableDiffusionPipeline, Path]:
    """A diffusers SD pipeline of ``family`` ("sd1" or "sd2"), saved under ``tmp``: (it, its folder)."""
    f = FAMILIES[family]
    encoder = text_encoder(CLIPTextModel, seed + 1, hidden_size=f["width"], intermediate_size=2 * f["width"],
                           num_hidden_layers=3, num_attention_heads=4, hidden_act=f["act"])
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / f"{family}-tok", pad_token=f["pad"]))
    pipe = StableDiffusionPipeline(vae=tiny_vae(seed + 2, scaling_factor=0.18215), text_encoder=encoder,
                                   tokenizer=tokenizer, unet=torch_unet(tiny_config(f["unet"]), seed=seed),
                                   scheduler=f["scheduler"](), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp / f"diffusers-{family}"
    pipe.save_pretrained(folder)
    return pipe, folder


def converted_sd_pipeline(tmp: Path, family: str, dtype: str = "float32") -> dict:
    """``pipe``: the diffusers pipeline; ``diffusers``: its folder; ``mlx``: our conversion of it."""
    pipe, folder = sd_pipeline(tmp, family)
    convert(folder, tmp / f"mlx-{family}", dtype=dtype, progress=False)
    return {"pipe": pipe, "diffusers": folder, "mlx": tmp / f"mlx-{family}"}
