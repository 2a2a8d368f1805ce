"""Everything a run can be refused for, checked before a model is loaded or memory allocated:
the numbers (``RunArguments``), the prompts, the sampler, whether the schedule leaves each model
a step, and whether the run fits in memory. ``mlx-unet generate`` runs these checks on the
folders' configs before loading anything; a pipeline's ``__call__`` on its loaded parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from ..configs.quantization import Quantization
from ..errors import InputError
from ..schedulers import Scheduler
from .arguments import RunArguments
from .folder import PipelineFolder
from .memory import RunEstimate, check_run_fits
from .schedule import schedule


def check_prompts(prompts: Sequence[str], name: str = "prompt") -> list[str]:
    """Prompts as text: a string or a non-empty list of strings, each encodable as UTF-8 (a
    command line's undecodable bytes arrive as lone surrogates, which the tokenizer cannot take)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{name} must be a string or a non-empty list of strings.")
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"{name} {prompt!r} holds bytes that are not UTF-8 text (at character {e.start}); "
                             "write it in UTF-8.") from None
    return prompts


@dataclass(frozen=True)
class RunPlan:
    """A run that passed every check: its size and its memory estimate."""

    height: int
    width: int
    images: int
    estimate: RunEstimate


def check_run(args: RunArguments, base: PipelineFolder, refiner: PipelineFolder | None, *, prompts: int,
              scheduler: str | Scheduler | None, sigmas: str | None = None, dtype: mx.Dtype, vae_dtype: mx.Dtype | None,
              tiled_vae: bool | None, low_memory: bool, vae_tile: int | None = None, vae_overlap: float = 0.25,
              vae_memory_budget: int | None = None, image_size: tuple[int, int] | None = None,
              quantize: Quantization | None = None, quantize_text_encoders: Quantization | None = None,
              release_unet: bool = False, widen_weights: bool = False) -> RunPlan:
    """Refuse (InputError / PipelineError) a run that cannot start or finish, before loading.

    ``image_size``: an img2img input's (height, width), which sets the size. ``vae_dtype`` None
    means the VAE's default (float32 where its config says ``force_upcast``); ``tiled_vae``,
    ``vae_tile``, ``vae_overlap``, ``vae_memory_budget``: the VAE's ``use_tiling``,
    ``tile_sample_size``, ``tile_overlap`` and ``memory_budget`` (``memory.estimate_run`` says how the decode is estimated). ``quantize`` /
    ``quantize_text_encoders``: what the models are quantized to as they load (parts stored
    quantized count as stored). ``release_unet``: the UNets are freed before the decode.
    ``widen_weights``: half-precision UNets are held in float32 while they denoise, as asked (a run
    that widens them by itself does so only where that fits, ``memory.widening_fits``)."""
    default = (base.unet.sample_size or 128) * 8
    height, width = image_size or (args.height or default, args.width or default)
    if refiner is not None and not (base.unet.has_text_time_embedding and refiner.unet.has_text_time_embedding):
        raise InputError(f"a refiner finishes an SDXL base model's images; this run pairs {base.family} base with "
                         f"{refiner.family} refiner: drop the refiner.")
    if args.img2img and refiner is not None:
        raise InputError("img2img (image=) runs one model; refine its output in a second call instead.")
    end = args.refiner_start if refiner is not None else None
    if refiner is not None and isinstance(scheduler, Scheduler):
        raise InputError("a run with a refiner takes its sampler by name (each model makes it on its own config), "
                         "not as a scheduler object.")
    if len(schedule(base.make_scheduler(scheduler, sigmas), args.steps, img2img=args.img2img, strength=args.strength,
                    denoising_end=end)[0]) == 0:
        raise InputError(f"refiner_start {args.refiner_start:g} of {args.steps} steps leaves the base model no step; "
                         "raise steps or refiner_start.")
    if refiner is not None and len(schedule(refiner.make_scheduler(scheduler, sigmas), args.steps, img2img=True,
                                            denoising_start=args.refiner_start)[0]) == 0:
        raise InputError(f"refiner_start {args.refiner_start:g} of {args.steps} steps leaves the refiner no step; "
                         "raise steps or lower refiner_start.")
    images = prompts * args.num_images_per_prompt
    last = refiner or base  # the folder whose VAE decodes
    if vae_dtype is None:
        vae_dtype = mx.float32 if last.vae.force_upcast else dtype
    estimate = check_run_fits(
        base.unet, last.vae, [e for e in base.encoders if e is not None], height=height, width=width, images=images,
        guided=args.guided(base.unet), dtype=dtype, vae_dtype=vae_dtype, tiled_vae=tiled_vae, vae_tile=vae_tile,
        vae_overlap=vae_overlap, vae_memory_budget=vae_memory_budget, low_memory=low_memory,
        refiner=None if refiner is None else refiner.unet, unet_quantization=base.quantization("unet", quantize),
        text_quantization=base.quantization(base.text_encoder_names[-1], quantize_text_encoders),
        release_unet=release_unet, widen_weights=widen_weights,
    )
    return RunPlan(height, width, images, estimate)
