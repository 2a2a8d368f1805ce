"""Previews and fast drafts with a tiny VAE (diffusers' AutoencoderTiny: madebyollin's TAESD for
SD 1.x / 2.x, TAESDXL for SDXL).

``DiffusionPipeline.load_tiny_vae`` loads one (``load``: a converted folder as it is, a diffusers
folder or Hub repo id converted for the call); then ``pipe(..., preview_every=N)`` hands the
callback ``PreviewStep``s whose ``preview`` is the tiny decoder's image of the step's latents every
N steps (``with_previews``), and ``pipe(..., vae="tiny")`` decodes the final image with it.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from ..configs.base import named
from ..configs.vae import TinyVAEConfig
from ..convert import convert
from ..convert.hub import is_offline, snapshot
from ..errors import InputError, PipelineError
from ..model_source import locate
from ..models.tiny_vae import AutoencoderTiny
from .arguments import check_int
from .folder import PipelineFolder
from .pixels import decode
from .sampler import Step

# madebyollin's tiny VAEs, one per latent space: SDXL's (base and refiner share it) and that of
# SD 1.x and 2.x.
TAESDXL = "madebyollin/taesdxl"
TAESD = "madebyollin/taesd"
VAES = ("full", "tiny")


def default_source(parts: PipelineFolder) -> str:
    """The tiny VAE of the pipeline's family: TAESDXL for SDXL, TAESD for SD 1.x / 2.x."""
    return TAESDXL if parts.unet.has_text_time_embedding else TAESD


# ---------------------------------------------------------------------- loading


@contextmanager
def converted(source: str | Path, progress: bool = False,
              log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """``with converted(source) as folder:``, a tiny VAE folder that mlx-unet converted:
    ``source`` itself where it is one, else ``source`` (diffusers' AutoencoderTiny folder, or a
    Hub repo id of one) converted, in float32, into a temporary folder removed when the block
    ends. Its config is checked first: a pipeline or a UNet is refused before any weights are read."""
    found = locate(source)
    usage = (f"pass diffusers' AutoencoderTiny folder, a tiny VAE converted by mlx-unet convert, or a Hub repo id "
             f"such as {TAESDXL}")
    if found.kind in ("converted", "file"):
        what = "a pipeline" if found.kind == "converted" else "a single file"
        raise InputError(f"the tiny VAE {found.text} is {what}; {usage}.")
    # A Hub repo's config.json alone first (a pipeline repo has none at its root).
    config_folder = found.path or snapshot(found.text, None, ["config.json"], offline=is_offline())
    with named(f"the tiny VAE {found.text}"):
        TinyVAEConfig.from_json(config_folder)
    if found.kind == "converted UNet":  # (a model alone that mlx-unet wrote; its config says which)
        yield found.path
        return
    temporary = Path(tempfile.mkdtemp(prefix="mlx-unet-"))
    try:
        if log is not None:
            log(f"converting the tiny VAE {found.text} for this run (mlx-unet convert makes a folder to reuse)")
        convert(found.text, temporary / "tiny_vae", dtype="float32", progress=progress)
        yield temporary / "tiny_vae"
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def load(source: str | Path | AutoencoderTiny | None, parts: PipelineFolder, dtype: mx.Dtype) -> AutoencoderTiny:
    """The tiny VAE ``source`` in ``dtype``, checked to decode the latents of the pipeline in
    ``parts``. ``source``: a loaded AutoencoderTiny (taken as it is), or what ``converted`` takes: a
    tiny VAE folder mlx-unet converted, diffusers' AutoencoderTiny folder or a Hub repo id of one;
    None: the family's (``default_source``)."""
    if source is None:
        source = default_source(parts)
    if isinstance(source, AutoencoderTiny):
        vae = source
    else:
        with converted(source) as folder:
            vae = AutoencoderTiny.from_pretrained(folder, dtype=dtype)
    tiny, full = vae.config, parts.vae
    if (tiny.latent_channels, tiny.upsample_factor) != (full.latent_channels, full.downsample_factor):
        raise PipelineError(
            f"the tiny VAE decodes {tiny.latent_channels}-channel latents {tiny.upsample_factor}x, but this pipeline's "
            f"are {full.latent_channels}-channel at 1/{full.downsample_factor} of the image; pass one of its family "
            f"({TAESDXL} for SDXL, {TAESD} for SD 1.x / 2.x).")
    return vae


# ---------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class PreviewStep(Step):
    """A ``Step`` with ``preview``: the tiny VAE's uint8 (B, H, W, 3) image of ``latents`` on the
    steps a preview is due (every ``preview_every``-th of a stage, and its last), else None."""

    preview: np.ndarray | None = None


def checked_callback(tiny: AutoencoderTiny | None, vae: str, preview_every: int | None,
                     callback: Callable[[str, Step], None] | None) -> Callable[[str, Step], None] | None:
    """``DiffusionPipeline.__call__``'s ``vae`` and ``preview_every`` checked before any work; the
    callback to run: ``callback``, handed previews where ``preview_every`` asks for them."""
    if vae not in VAES:
        raise InputError(f"vae must be 'full' or 'tiny', got {vae!r}.")
    if preview_every is not None:
        check_int("preview_every", preview_every, minimum=1)
        if callback is None:
            raise InputError("preview_every hands each preview to the callback (as step.preview); pass a callback.")
    if tiny is None and (vae == "tiny" or preview_every is not None):
        asked = "vae='tiny'" if vae == "tiny" else "preview_every"
        raise InputError(f"{asked} needs a tiny VAE; load one first with pipe.load_tiny_vae() ({TAESDXL} for SDXL, "
                         f"{TAESD} for SD 1.x / 2.x, by default).")
    return callback if preview_every is None else with_previews(callback, tiny, preview_every)


def with_previews(callback: Callable[[str, Step], None], vae: AutoencoderTiny,
                  every: int) -> Callable[[str, Step], None]:
    """``callback``, handed a ``PreviewStep`` at every step: with the preview every ``every``
    steps of each stage and at its last (so that the last preview shows the finished latents)."""
    def call(stage: str, step: Step) -> None:
        done = step.index + 1
        image = decode(vae, step.latents) if done % every == 0 or done == step.total else None
        callback(stage, PreviewStep(**{f.name: getattr(step, f.name) for f in fields(Step)}, preview=image))

    return call
