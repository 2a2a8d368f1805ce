"""What a run conditions every step on: the context, SDXL's added inputs (pooled text embedding
and micro-conditioning time ids, made as diffusers' pipelines make them), a 9-channel inpainting
UNet's extra channels, an LCM distillation's guidance embedding; and guidance rescale."""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from ..configs.unet import UNetConfig
from ..errors import InputError
from ..models.unet import UNet2DConditionModel


@dataclass(frozen=True)
class Conditioning:
    """What every step of a run is conditioned on (``Sampler.prepare_conditioning``), as prepared
    (float32) until ``for_unet`` puts it in the dtype the run computes in. Under classifier-free
    guidance the batch is doubled, the negative half first as diffusers has it. An LCM
    distillation takes the guidance scale as an embedding instead, and a batch of one."""

    context: mx.array  # (B or 2B, tokens, width)
    # SDXL's pooled text embedding and time ids (B or 2B, ...), which make its added embedding;
    # None for SD 1.x/2.x.
    added_inputs: tuple[mx.array, mx.array] | None
    guidance_scale: float
    guidance_rescale: float = 0.0
    # A 9-channel inpainting UNet's mask and masked-image latents (B or 2B, h, w, 5), concatenated
    # after the latents at every step.
    extra_channels: mx.array | None = None
    # An LCM distillation's guidance-scale embedding (B, time_cond_proj_dim).
    timestep_cond: mx.array | None = None
    # SDXL's added embedding (B or 2B, time_embed_dim), made once by ``for_unet``.
    added_embedding: mx.array | None = None

    def for_unet(self, unet: UNet2DConditionModel) -> "Conditioning":
        """In ``unet``'s dtype, with SDXL's added embedding made (once for every step). On the
        CPU kernels a half-precision UNet's dtype is float32 (``cpu.widen``): its run conditions
        in float32 as a float32 UNet's does."""
        dtype = unet.dtype
        added = None
        if self.added_inputs is not None:
            text_embeds, time_ids = self.added_inputs
            added = unet.added_embedding(text_embeds.astype(dtype), time_ids)
            mx.eval(added)

        def cast(a):
            return None if a is None else a.astype(dtype)

        return replace(self, context=cast(self.context), extra_channels=cast(self.extra_channels),
                       timestep_cond=cast(self.timestep_cond), added_embedding=added)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0 and self.timestep_cond is None


def micro_conditioning(config: UNetConfig, pooled_width: int, size, original_size, crops, target_size,
                       negative_original_size, negative_crops, negative_target_size, aesthetic_score,
                       negative_aesthetic_score, img2img: bool) -> tuple[mx.array, mx.array]:
    """SDXL's time ids and negative time ids: (original h, w, crop top, left, target h, w), or for the
    refiner, whose add_embedding takes one id less, the aesthetic score instead of the target.

    The negative ids follow diffusers' two pipelines exactly, quirks included: text-to-image
    uses them only when both negative sizes are given (crops default (0, 0)), else repeats the
    positive ids; img2img defaults the negative sizes to the positive ones and, with 6 ids,
    uses the positive crops.
    """
    n_ids, remainder = divmod(config.projection_class_embeddings_input_dim - pooled_width, config.addition_time_embed_dim)
    if remainder or n_ids not in (5, 6):
        raise InputError(
            f"pooled_prompt_embeds of width {pooled_width} leave {config.projection_class_embeddings_input_dim - pooled_width} "
            f"features for time ids of width {config.addition_time_embed_dim}: not SDXL's 6 (base) or 5 (refiner)."
        )
    original_size, target_size = tuple(original_size or size), tuple(target_size or size)
    negative_crops = tuple(negative_crops if negative_crops is not None else (0, 0))
    if n_ids == 5:
        ids = [*original_size, *crops, aesthetic_score]
        negative = [*(negative_original_size or original_size), *negative_crops, negative_aesthetic_score]
    else:
        ids = [*original_size, *crops, *target_size]
        if img2img:
            negative = [*(negative_original_size or original_size), *crops, *(negative_target_size or target_size)]
        elif negative_original_size is not None and negative_target_size is not None:
            negative = [*negative_original_size, *negative_crops, *negative_target_size]
        else:
            negative = ids
    return mx.array(ids, dtype=mx.float32), mx.array(negative, dtype=mx.float32)


def rescale_guidance(guided: mx.array, cond: mx.array, factor: float) -> mx.array:
    """Rescale the guided prediction to the conditional one's spread (Lin et al. 2023, 3.4), mixed
    by ``factor``. Standard deviations are per sample; diffusers' Bessel correction cancels in the ratio."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (mx.std(cond, axis=axes, keepdims=True) / mx.std(guided, axis=axes, keepdims=True))
    return factor * rescaled + (1 - factor) * guided
