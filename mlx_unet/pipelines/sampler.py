"""The denoising loop around the UNet: SDXL (and SD 1.x/2.x) sampling from prompt embeddings.

Mirrors diffusers' StableDiffusionXLPipeline / ...Img2ImgPipeline between "prompt embeddings in"
and "latents out": classifier-free guidance as one batch of two (negative first), guidance
rescale, the micro-conditioning time ids, img2img strength, inpainting (``pipelines.inpaint``:
a 9-channel UNet's extra input, a 4-channel UNet's blend after each step) and the base ->
refiner hand-off (``denoising_end`` on the base, ``denoising_start`` on the refiner). Latents
are NHWC.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
from mlx.utils import tree_map

from ..errors import InputError, NonFiniteWarning
from ..models.embeddings import guidance_scale_embedding
from ..models.unet import UNet2DConditionModel
from .arguments import (
    IMG2IMG_STRENGTH,
    MAX_GUIDANCE,
    MAX_STEPS,
    PIXELS_PER_LATENT,
    check_finite_array,
    classifier_free,
    check_int,
    check_real,
    check_seed,
    check_size,
    strength_steps,
)
from .conditioning import Conditioning, micro_conditioning, rescale_guidance
from .inpaint import Inpainting, KnownRegion, check_unet
from .run import RunSettings
from .schedule import schedule


@dataclass(frozen=True)
class Step:
    """Progress of one denoising step, yielded by ``Sampler.steps`` after the step is evaluated."""

    index: int  # 0-based
    total: int
    timestep: float
    latents: mx.array
    seconds: float  # wall time of this step


@dataclass(frozen=True)
class Start:
    """Where a run starts (``Sampler.prepare_latents``): float32 latents as the first step takes
    them, the timesteps to run, and the key of the stochastic samplers' per-step noise."""

    latents: mx.array
    timesteps: mx.array
    key: mx.array
    known: KnownRegion | None = None  # a 4-channel UNet's inpainting: put back after every step


class Sampler:
    """A UNet and a scheduler; ``sampler(...)`` returns the final latents, ``sampler.steps(...)``
    yields a ``Step`` after each one (the last one's latents are the result).

    ``compile``, ``low_memory``, ``widen_weights`` and ``narrow_back`` are the settings of its
    runs (``pipelines.run.RunSettings``): the UNet through ``mx.compile``, by default on Metal and
    CUDA and not on the CPU; for 8-16 GB machines, the UNet evaluated block by block with a small
    buffer cache, and classifier-free guidance's two halves one after the other instead of as
    one batch of two; on the CPU, a half-precision UNet held in float32 for the run where asked,
    or by default where that pays and fits. The UNet comes out of a run as it went in
    (``narrow_back=False``: widened weights stay in float32, for a caller that frees it next).
    """

    def __init__(self, unet: UNet2DConditionModel, scheduler, compile: bool | None = None, low_memory: bool = False,
                 widen_weights: bool | None = None, narrow_back: bool = True):
        self.unet = unet
        self.scheduler = scheduler
        self.settings = RunSettings(compile=compile, low_memory=low_memory, widen_weights=widen_weights,
                                    narrow_back=narrow_back)

    def __call__(self, *args, **kwargs) -> mx.array:
        for step in self.steps(*args, **kwargs):  # steps() refuses a run of no step
            pass
        return step.latents

    def steps(
        self,
        prompt_embeds: mx.array,
        pooled_prompt_embeds: mx.array | None = None,
        *,
        negative_prompt_embeds: mx.array | None = None,
        negative_pooled_prompt_embeds: mx.array | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        seed: int | None = None,
        latents: mx.array | None = None,
        image_latents: mx.array | None = None,
        inpainting: Inpainting | None = None,
        strength: float = IMG2IMG_STRENGTH,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
    ) -> Iterator[Step]:
        """Denoise; see the class docstring. The arguments are checked and the conditioning and
        starting latents prepared at the call; the returned iterator runs the loop.

        Sizes are in pixels (the latent is 8x smaller); they default to the UNet's sample_size.
        ``latents``: initial noise (B, h, w, C) instead of drawing it from ``seed``.
        ``image_latents``: img2img / refiner input, already in latent space (the VAE's scaled
        latents). With it, ``strength`` picks how much of the schedule runs, or ``denoising_start``
        where it starts (the refiner half of a hand-off: no noise is added then).
        ``inpainting``: what ``pipelines.inpaint.prepare`` made of an image and its mask; the run
        takes ``strength`` of the schedule as img2img does, from pure noise at 1 (diffusers'
        inpainting default).
        Without a negative prompt, classifier-free guidance uses zeros (SDXL's
        ``force_zeros_for_empty_prompt``).
        """
        img2img = image_latents is not None or inpainting is not None
        self._check_arguments(num_inference_steps, guidance_scale, guidance_rescale, seed, strength,
                              denoising_start, denoising_end, img2img,
                              prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                              negative_prompt_embeds=negative_prompt_embeds,
                              negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                              latents=latents, image_latents=image_latents)
        check_unet(self.unet.config, inpainting)
        # (the mask is at latent size, as image latents are)
        size = self._pixel_size(height, width, latents, image_latents if inpainting is None else inpainting.mask)
        conditioning = self.prepare_conditioning(
            prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, size=size, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score, img2img=img2img,
            inpainting=inpainting,
        )
        start = self.prepare_latents(
            prompt_embeds.shape[0], size, num_inference_steps, seed=seed, latents=latents,
            image_latents=image_latents, inpainting=inpainting, strength=strength,
            denoising_start=denoising_start, denoising_end=denoising_end,
        )
        if start.timesteps.shape[0] == 0:
            raise InputError(f"the schedule of {num_inference_steps} steps leaves no step to run from denoising_start "
                             f"{denoising_start} / denoising_end {denoising_end}; raise num_inference_steps or move "
                             "the hand-off away from the end of the schedule.")
        return self.loop(conditioning, start)

    def prepare_conditioning(
        self,
        prompt_embeds: mx.array,
        pooled_prompt_embeds: mx.array | None = None,
        *,
        negative_prompt_embeds: mx.array | None = None,
        negative_pooled_prompt_embeds: mx.array | None = None,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        size: tuple[int, int],
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        img2img: bool = False,
        inpainting: Inpainting | None = None,
    ) -> Conditioning:
        """The context and (SDXL) added embedding of a run, for ``size`` = (height, width) pixels;
        the arguments are those of :meth:`steps` (``img2img``: an image or inpainting run, whose
        SDXL time ids are img2img's, as in diffusers' inpainting pipeline)."""
        config = self.unet.config
        batch = prompt_embeds.shape[0]
        guided = classifier_free(guidance_scale, config)
        added = None
        if config.has_text_time_embedding:
            if pooled_prompt_embeds is None:
                raise InputError("this SDXL UNet needs pooled_prompt_embeds (the pooled text embedding).")
            time_ids, negative_time_ids = micro_conditioning(
                config, pooled_prompt_embeds.shape[-1], size, original_size, crops_coords_top_left, target_size,
                negative_original_size, negative_crops_coords_top_left, negative_target_size,
                aesthetic_score, negative_aesthetic_score, img2img,
            )
            text_embeds = pooled_prompt_embeds
            time_ids = mx.broadcast_to(time_ids, (batch, time_ids.shape[0]))
            if guided:
                negative_pooled = (
                    mx.zeros_like(pooled_prompt_embeds) if negative_pooled_prompt_embeds is None
                    else negative_pooled_prompt_embeds
                )
                text_embeds = mx.concatenate([negative_pooled, text_embeds])
                time_ids = mx.concatenate([mx.broadcast_to(negative_time_ids, time_ids.shape), time_ids])
            added = (text_embeds, time_ids)
        context = prompt_embeds
        if guided:
            negative = mx.zeros_like(prompt_embeds) if negative_prompt_embeds is None else negative_prompt_embeds
            context = mx.concatenate([negative, prompt_embeds])
        extra = None if inpainting is None else inpainting.extra_channels(guided)
        timestep_cond = None
        if config.time_cond_proj_dim is not None:
            timestep_cond = guidance_scale_embedding(guidance_scale, config.time_cond_proj_dim, batch)
        return Conditioning(context, added, guidance_scale, guidance_rescale, extra, timestep_cond)

    def prepare_latents(
        self,
        batch: int,
        size: tuple[int, int],
        num_inference_steps: int,
        *,
        seed: int | None = None,
        latents: mx.array | None = None,
        image_latents: mx.array | None = None,
        inpainting: Inpainting | None = None,
        strength: float = IMG2IMG_STRENGTH,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
    ) -> Start:
        """Set the scheduler's timesteps and make the starting latents of ``batch`` images of
        ``size`` = (height, width) pixels; the arguments are those of :meth:`steps`."""
        sched = self.scheduler
        key = mx.random.key(seed if seed is not None else int(time.time_ns() % 2**31))
        noise_key, step_key = mx.random.split(key)
        height, width = size
        # The UNet's output channels: a 9-channel inpainting UNet takes 5 more in than the latents have.
        shape = (batch, height // PIXELS_PER_LATENT, width // PIXELS_PER_LATENT, self.unet.config.out_channels)
        if inpainting is not None and (image_latents is not None or denoising_start is not None):
            raise InputError("inpainting starts from its own image latents at its strength; give it neither "
                             "image_latents nor denoising_start.")
        if denoising_start is not None and image_latents is None:
            raise InputError("denoising_start needs image_latents (the base model's output to refine).")
        img2img = image_latents is not None or inpainting is not None
        timesteps, begin = schedule(sched, num_inference_steps, img2img=img2img, strength=strength,
                                    denoising_start=denoising_start, denoising_end=denoising_end)

        def noise() -> mx.array:  # drawn only for a start that needs it (a refiner's does not)
            return (latents if latents is not None else mx.random.normal(shape, key=noise_key)).astype(mx.float32)

        if inpainting is not None:
            drawn = noise()
            x = inpainting.start(sched, drawn, timesteps[:1], strength)
            return Start(x, timesteps, step_key, inpainting.known_region(drawn))
        if image_latents is None:
            x = noise() * sched.init_noise_sigma
        else:
            x = image_latents.astype(mx.float32)
            if denoising_start is None:  # img2img: noise the image up to the first timestep
                x = sched.add_noise(x, noise(), timesteps[:1])
        return Start(x, timesteps, step_key)

    def loop(self, conditioning: Conditioning, start: Start) -> Iterator[Step]:
        """The denoising loop, one evaluation per step, from what the two ``prepare_`` methods
        made (``prepare_latents`` just before: it set the scheduler up). The run settings hold
        from the first step until the loop ends or is closed."""
        sched = self.scheduler
        guided, scale = conditioning.guided, conditioning.guidance_scale
        x, timesteps = start.latents, start.timesteps
        total = timesteps.shape[0]
        step_keys = mx.random.split(start.key, max(total, 1))
        warned = False
        batch = conditioning.context.shape[0]  # the UNet's: doubled under guidance
        with self.settings.applied(self.unet, forwards=total, sample=(batch, *x.shape[1:])):
            dtype = self.unet.dtype  # float32 for a half-precision UNet on the CPU kernels
            conditioning = conditioning.for_unet(self.unet)
            forward = self.settings.forward(self.unet)
            # The text's keys and values in every cross-attention layer: the same in every step.
            text_kv = self.unet.cross_attention_kv(conditioning.context)
            mx.eval(text_kv)
            for i in range(total):
                begin = time.perf_counter()
                t = timesteps[i]
                model_input = mx.concatenate([x, x]) if guided else x
                model_input = sched.scale_model_input(model_input, t).astype(dtype)
                if conditioning.extra_channels is not None:
                    model_input = mx.concatenate([model_input, conditioning.extra_channels], axis=-1)
                prediction = self._predict(forward, model_input, t, text_kv, conditioning).astype(mx.float32)
                if guided:
                    uncond, cond = mx.split(prediction, 2)
                    prediction = uncond + scale * (cond - uncond)
                    if conditioning.guidance_rescale > 0:
                        prediction = rescale_guidance(prediction, cond, conditioning.guidance_rescale)
                noise = mx.random.normal(x.shape, key=step_keys[i]) if sched.stochastic else None
                x = sched.step(prediction, t, x, noise=noise).prev_sample
                if start.known is not None:
                    x = start.known.blend(sched, x, timesteps[i + 1:i + 2])
                mx.eval(x)
                if not warned and not mx.all(mx.isfinite(x)).item():
                    warned = True  # once: every later step of the run inherits the NaN
                    warnings.warn(NonFiniteWarning(
                        f"step {i + 1} of {total} made NaN or infinite latents, so the image will be black or noise; "
                        "the weights may hold NaN, or float16 overflowed (try --dtype float32 / dtype=mx.float32)."))
                yield Step(i, total, float(t.item()), x, time.perf_counter() - begin)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _check_arguments(steps, guidance_scale, guidance_rescale, seed, strength, denoising_start, denoising_end,
                         img2img: bool, **arrays) -> None:
        check_int("num_inference_steps", steps, 1, MAX_STEPS)
        check_real("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE)
        check_real("guidance_rescale", guidance_rescale, 0.0, 1.0)
        check_seed(seed)
        if img2img and denoising_start is None:
            check_real("strength", strength, 0.0, 1.0, open_below=True)
            if strength_steps(steps, strength) < 1:
                raise InputError(f"strength {strength:g} of {steps} steps leaves no step to run; raise "
                                 f"num_inference_steps or strength to at least {1 / steps:.3g}.")
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None:
                check_real(name, value, 0.0, 1.0, open_below=True)
        for name, array in arrays.items():
            if array is not None:
                check_finite_array(name, array)

    def _pixel_size(self, height, width, latents, image_latents) -> tuple[int, int]:
        if image_latents is not None:
            _, h, w, _ = image_latents.shape
            height, width = h * PIXELS_PER_LATENT, w * PIXELS_PER_LATENT
        elif latents is not None:
            height, width = latents.shape[1] * PIXELS_PER_LATENT, latents.shape[2] * PIXELS_PER_LATENT
        default = (self.unet.config.sample_size or 128) * PIXELS_PER_LATENT
        height, width = check_size("height", height), check_size("width", width)
        return height or default, width or default

    def _predict(self, forward, model_input, t, text_kv: dict, conditioning: Conditioning) -> mx.array:
        added, cond = conditioning.added_embedding, conditioning.timestep_cond
        if not self.settings.low_memory or model_input.shape[0] == 1:
            return forward(model_input, t, None, cross_attention_kv=text_kv, added_embedding=added,
                           timestep_cond=cond)
        # One sample at a time: the activations of a batch of one, at the cost of reading the
        # weights once per sample.
        halves = []
        for i in range(model_input.shape[0]):
            one = (lambda a: None if a is None else a[i:i + 1])
            halves.append(forward(model_input[i:i + 1], t, None, cross_attention_kv=tree_map(one, text_kv),
                                  added_embedding=one(added), timestep_cond=one(cond)))
            mx.eval(halves[-1])
        return mx.concatenate(halves)
