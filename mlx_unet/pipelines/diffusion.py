"""Prompt in, image out, in MLX alone (no torch at run time): what every Stable Diffusion
pipeline shares, whatever its family. ``SDPipeline`` (SD 1.x / 2.x) and ``SDXLPipeline`` differ
only in how prompts become the UNet's context (``_encode``); text-to-image, img2img and
inpainting are modes of one call, as in diffusers' StableDiffusion[XL][Img2Img|Inpaint]Pipeline.

The folder is what ``mlx-unet convert`` writes for a whole pipeline (``unet/``, ``vae/``,
``text_encoder[_2]/``, ``tokenizer[_2]/``, ``scheduler/``, ``model_index.json``).

Memory: the UNet is loaded when a call first needs it, after the prompt is encoded (or when
``pipe.unet`` is read, by ``load_lora`` say), and the text encoders are loaded for the prompt and
released before the denoising loop, so a first call holds at most one of (encoders, UNet) with
the VAE. ``release_unet=True`` frees the UNet before the VAE decodes (a one-shot run's last
image: the decode then has the memory to itself); it is loaded again, with its LoRAs, when a
later call needs it.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..cpu.heap import reused_heap
from ..configs.quantization import Quantization, as_quantization, text_encoder_quantization
from ..errors import InputError, PipelineError
from ..models.clip import CLIPTextModel
from ..models.tiny_vae import AutoencoderTiny
from ..models.unet import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from ..schedulers import Scheduler
from ..tokenizer import CLIPTokenizer
from .arguments import IMG2IMG_STRENGTH, INPAINT_STRENGTH, RunArguments, check_finite_array
from . import inpaint, loras, previews
from .folder import TEXT_PARTS, PipelineFolder
from .loras import PipelineLoRA
from .pixels import batched, checked_image, decode, encode, to_pixels
from .preflight import check_prompts, check_run
from .prompts import PromptEmbeddings, PromptTokens, check_max_tokens, encode_sides, per_prompt
from .sampler import Sampler, Step


class DiffusionPipeline:
    """``load_pipeline(folder)(prompt)`` -> uint8 images (B, H, W, 3); ``load_pipeline`` is
    ``DiffusionPipeline.from_pretrained``, which picks the family's class from the folder."""

    tiny_vae: AutoencoderTiny | None = None  # for previews and vae="tiny" (``load_tiny_vae``)

    def __init__(self, parts: PipelineFolder, unet: UNet2DConditionModel | None, vae: AutoencoderKL,
                 tokenizers: list[CLIPTokenizer | None], dtype: mx.Dtype, keep_text_encoders: bool = False,
                 quantize: Quantization | None = None, quantize_text_encoders: Quantization | None = None):
        self.parts = parts
        self.quantize, self.quantize_text_encoders = quantize, quantize_text_encoders  # asked of dense parts
        self.folder = parts.path
        self._unet: UNet2DConditionModel | None = unet
        self.vae = vae
        self.tokenizers = tokenizers
        self.dtype = dtype
        self.keep_text_encoders = keep_text_encoders
        self._encoders: list[CLIPTextModel | None] | None = None
        self.loras: list[PipelineLoRA] = []

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: mx.Dtype = mx.float16, vae_dtype: mx.Dtype | None = None,
                        keep_text_encoders: bool = False, quantize: Quantization | int | None = None,
                        quantize_text_encoders: Quantization | int | bool | None = None) -> "DiffusionPipeline":
        """Load a converted pipeline folder. ``dtype`` is for the UNet and text encoders; the VAE
        defaults to float32 unless its config says it is safe in half precision (the fp16-fix VAE).
        ``keep_text_encoders``: keep them loaded between calls (faster repeated prompts, more memory).
        ``quantize``: quantize the UNet as it loads (bits, 8 or 4, or a ``Quantization``);
        ``quantize_text_encoders`` the text encoders (default: 8 bits when ``quantize`` is given;
        False: dense). Parts a quantized conversion stored load as stored; the VAE stays dense.
        The whole folder is checked (``PipelineFolder.read``) before any weights are read.
        Called on ``DiffusionPipeline`` it returns the folder's family's class; called on a
        family's class, a folder of another family is refused."""
        parts = folder if isinstance(folder, PipelineFolder) else PipelineFolder.read(folder)
        family = cls.family_class(parts)
        if cls is DiffusionPipeline:
            cls = family
        elif not issubclass(family, cls):
            raise PipelineError(f"{parts.path} holds {parts.family} pipeline, not one {cls.__name__} runs; load it "
                                "with mlx_unet.load_pipeline, which picks the class.")
        quantize = as_quantization(quantize)
        text = text_encoder_quantization(quantize, quantize_text_encoders)
        tokenizers = [None if parts.part(t) is None else CLIPTokenizer.from_folder(parts.part(t)) for t, _ in TEXT_PARTS]
        vae = AutoencoderKL.from_pretrained(parts.part("vae"), dtype=vae_dtype)
        return cls(parts, None, vae, tokenizers, dtype, keep_text_encoders, quantize, text)

    @property
    def unet(self) -> UNet2DConditionModel:
        """The UNet, loaded on first use, and again (with the pipeline's LoRAs) if ``release_unet``
        freed it."""
        if self._unet is None:
            self._unet = _load_unet(self.parts, self.dtype, self.quantize)
            for lora in self.loras:
                lora.apply_to_unet(self._unet)
        return self._unet

    def release_unet(self) -> None:
        """Free the UNet's weights until the next call that needs them."""
        self._unet = None
        for lora in self.loras:
            lora.unet_released()
        mx.clear_cache()

    def _text_encoders(self) -> list[CLIPTextModel | None]:
        if self._encoders is None:
            self._encoders = []
            for _, name in TEXT_PARTS:
                folder = self.parts.part(name)
                # A part stored quantized loads as stored; the default 8-bit of a dense one does not apply.
                quantize = None if name in self.parts.quantized else self.quantize_text_encoders
                self._encoders.append(None if folder is None else
                                      CLIPTextModel.from_pretrained(folder, dtype=self.dtype, quantize=quantize))
            for lora in self.loras:
                lora.apply_to_encoders(self._encoders)
        return self._encoders

    @property
    def loaded_text_encoders(self) -> list[CLIPTextModel | None] | None:
        """The text encoders while they are loaded (for a prompt, or kept), else None."""
        return self._encoders

    def release_text_encoders(self) -> None:
        self._encoders = None
        for lora in self.loras:
            lora.encoders_released()
        mx.clear_cache()

    # ------------------------------------------------------------------ LoRA

    def load_lora(self, source, scale: float = 1.0, *, fuse: bool = True, unet_scale: float | None = None,
                  text_encoder_scale: float | None = None, weight_name: str | None = None,
                  revision: str | None = None, allow_pickle: bool = False) -> PipelineLoRA:
        """Apply a LoRA file (a path, a folder holding one, a Hub repo id, or a ``lora.LoRAFile``)
        to the UNet and the text encoders; returns the handle that removes it.

        ``scale`` is its strength (``unet_scale`` / ``text_encoder_scale`` set the parts apart).
        ``fuse=True`` adds it into the weights (no cost per step; removed bit for bit);
        ``fuse=False`` applies it live (a branch beside each layer: strength changeable without
        reloading, and it works over quantized layers). Several LoRAs add up. The whole file is
        checked before anything changes; modules that name no layer are listed in a warning.
        """
        handle = loras.load(self, source, scale, fuse, unet_scale, text_encoder_scale, weight_name, revision,
                            allow_pickle)
        self.loras.append(handle)
        return handle

    def unload_loras(self) -> None:
        """Remove every LoRA, newest first."""
        for lora in reversed(list(self.loras)):
            lora.remove()

    def load_tiny_vae(self, source: str | Path | AutoencoderTiny | None = None,
                      dtype: mx.Dtype | None = None) -> AutoencoderTiny:
        """Load (and return) the tiny VAE that ``preview_every`` and ``vae="tiny"`` decode with:
        ``source`` as ``previews.load`` takes it, by default the family's (madebyollin/taesdxl or
        madebyollin/taesd), in ``dtype`` (default: the VAE's)."""
        self.tiny_vae = previews.load(source, self.parts, self.vae.dtype if dtype is None else dtype)
        return self.tiny_vae

    def scheduler(self, name: str | Scheduler | None = None, sigmas: str | None = None):
        """The named sampler (see ``schedulers.make_scheduler``: ours, the web UI's or ComfyUI's
        names) on this model's scheduler config, by default the one the model ships with;
        ``sigmas`` a sigma schedule (karras, exponential, beta, ays, default)."""
        return self.parts.make_scheduler(name, sigmas)

    # ------------------------------------------------------------------ prompt

    @staticmethod
    def family_class(parts: PipelineFolder) -> type["DiffusionPipeline"]:
        """The class that runs the pipeline in ``parts``: SDXL's UNet takes the added
        text-and-time embedding, SD 1.x / 2.x's does not."""
        from .sd import SDPipeline
        from .sdxl import SDXLPipeline

        return SDXLPipeline if parts.unet.has_text_time_embedding else SDPipeline

    def _encode(self, tokens: list[PromptTokens | None], clip_skip: int | None) -> tuple[mx.array, mx.array | None]:
        """diffusers' encode_prompt for one side, from each text encoder's (batch, chunks, 77)
        tokens (None where the pipeline has no such encoder): (token states (batch, chunks * 77,
        width), the first chunk's pooled embedding or None)."""
        raise NotImplementedError

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      prompt_2: str | Sequence[str] | None = None,
                      negative_prompt_2: str | Sequence[str] | None = None,
                      clip_skip: int | None = None, guided: bool = True, prompt_weighting: bool = True,
                      max_tokens: int | None = None) -> PromptEmbeddings:
        """The UNet's conditioning for ``prompt`` (and the negative prompt where ``guided``).

        ``prompt_weighting``: read AUTOMATIC1111's syntax ("(word:1.3)", "[word]", "BREAK"; see
        ``pipelines.prompts``); False: the text as written. ``max_tokens``: None encodes long
        prompts in chunks of 75 tokens; 77 cuts them there with a warning, as diffusers does.
        Identical prompts in the batch (with their prompt_2) are encoded once."""
        prompts = check_prompts(prompt)
        self.parts.check_clip_skip(clip_skip)
        check_max_tokens(max_tokens)
        if not isinstance(prompt_weighting, bool):
            raise InputError(f"prompt_weighting must be True or False, not {prompt_weighting!r}.")
        if (prompt_2 is not None or negative_prompt_2 is not None) and self.parts.encoders[1] is None:
            raise InputError("prompt_2 and negative_prompt_2 are for SDXL's second text encoder; this pipeline has one.")
        prompts_2 = prompts if prompt_2 is None else check_prompts(prompt_2, "prompt_2")
        if len(prompts_2) != len(prompts):
            raise PipelineError(f"prompt_2 has {len(prompts_2)} entries for {len(prompts)} prompts.")
        # diffusers' rule, in both families: clip_skip applies to the prompt only, the negative
        # prompt is encoded from the usual layer.
        sides = [(prompts, prompts_2, clip_skip)]
        # SDXL base encodes no negative prompt when none is given: zeros of the prompt's shape
        # stand in for it (as in diffusers, a lone negative_prompt_2 does not change that).
        zero_negative = negative_prompt is None and self.parts.force_zeros_for_empty_prompt
        if guided and not zero_negative:
            negatives = per_prompt("" if negative_prompt is None else negative_prompt, "negative_prompt", len(prompts))
            negatives_2 = negatives if negative_prompt_2 is None else \
                per_prompt(negative_prompt_2, "negative_prompt_2", len(prompts))
            sides.append((negatives, negatives_2, None))
        encoded = encode_sides(sides, self.tokenizers, self._encode, prompt_weighting, max_tokens)
        embeddings = PromptEmbeddings(*encoded, *[None] * (4 - len(encoded)))
        mx.eval([a for a in vars(embeddings).values() if a is not None])
        if not self.keep_text_encoders:
            self.release_text_encoders()
        return embeddings

    # ------------------------------------------------------------------ generation

    def __call__(
        self,
        prompt: str | Sequence[str] | None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        prompt_embeds: PromptEmbeddings | None = None,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        steps: int = 30,
        guidance: float = 5.0,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents: mx.array | None = None,
        image: np.ndarray | mx.array | None = None,
        mask_image: np.ndarray | mx.array | None = None,
        strength: float | None = None,
        scheduler: str | Scheduler | None = None,
        sigmas: str | None = None,
        clip_skip: int | None = None,
        prompt_weighting: bool = True,
        max_tokens: int | None = None,
        refiner: "DiffusionPipeline | None" = None,
        refiner_start: float = 0.8,
        low_memory: bool = False,
        widen_weights: bool | None = None,
        release_unet: bool = False,
        callback: Callable[[str, Step], None] | None = None,
        preview_every: int | None = None,
        vae: str = "full",
        output: str = "uint8",
    ) -> np.ndarray | mx.array:
        """Images for ``prompt``: uint8 (B, H, W, 3); ``output="float"`` gives floats in [0, 1],
        ``output="latent"`` the final (scaled) latents.

        ``prompt_embeds``: what ``encode_prompt`` made, instead of ``prompt`` and the negative
        prompts (several runs of one prompt encode it once).
        ``latents``: the initial noise (B, H/8, W/8, 4) instead of drawing it from ``seed``.
        ``image``: img2img: (B or 1, H, W, 3) uint8, or floats in [0, 1] as diffusers takes them;
        it is encoded by the VAE and noised up to ``strength`` of the schedule (1: all of it;
        default 0.3, and 1.0 when inpainting, as in diffusers).
        ``mask_image``: inpainting (with ``image``): (B or 1, H, W) or (B or 1, H, W, 1), uint8
        or floats in [0, 1]; white (1) is repainted, black kept.
        ``refiner``: an SDXL refiner pipeline that takes over at ``refiner_start`` of the
        schedule (diffusers' ensemble of experts: ``denoising_end`` / ``denoising_start``).
        ``widen_weights``: on the CPU, a half-precision UNet held in float32 for each denoising
        stage: True, False, or None where that pays and fits (``pipelines.run.RunSettings``).
        ``release_unet``: free the UNet at the end of its denoising (by an exception too), and a
        refiner's at the end of its own, so that the refiner's and the decode do not add to its
        weights (for the last image of a run: a later call loads it again).
        ``callback(stage, step)`` is called after every step; stage is "base" or "refiner".
        ``preview_every``: N makes each step a ``previews.PreviewStep`` whose ``preview`` is the tiny
        VAE's uint8 (B, H, W, 3) image of its latents every N steps of a stage and at its last.
        ``vae="tiny"``: the final image decoded by the tiny VAE, a fast draft (``load_tiny_vae`` first).
        ``prompt_weighting``, ``max_tokens``: as for ``encode_prompt`` (A1111's "(word:1.3)"
        syntax, and long prompts in chunks unless ``max_tokens=77``).
        """
        if mask_image is not None and image is None:
            raise InputError("mask_image needs image: the picture whose white-masked part is repainted.")
        if strength is None:
            strength = INPAINT_STRENGTH if mask_image is not None else IMG2IMG_STRENGTH
        args = RunArguments(steps, guidance, guidance_rescale, height, width, num_images_per_prompt, seed, strength,
                            refiner_start, img2img=image is not None, refined=refiner is not None)
        if output not in ("uint8", "float", "latent"):
            raise InputError(f"output must be 'uint8', 'float' or 'latent', got {output!r}.")
        if not isinstance(release_unet, bool):
            raise InputError(f"release_unet must be True or False, not {release_unet!r}.")
        if widen_weights is not None and not isinstance(widen_weights, bool):
            raise InputError(f"widen_weights must be True, False or None (where it pays), not {widen_weights!r}.")
        callback = previews.checked_callback(self.tiny_vae, vae, preview_every, callback)
        texts = (("negative_prompt", negative_prompt), ("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2))
        if prompt_embeds is None:
            count = len(check_prompts(prompt))
        else:
            given = [name for name, text in texts if text is not None]
            if given or (refiner is not None and prompt is None):
                raise InputError(f"{', '.join(given) or 'a refiner'} goes with prompt, not prompt_embeds: pass them "
                                 "to encode_prompt (and the prompt too, for a refiner's own encoders).")
            count = prompt_embeds.context.shape[0]
        for name, text in texts:
            if text is not None:
                check_prompts(text, name)
        size = None  # the image's or the latents' size, where given, else the arguments'
        if latents is not None:
            check_finite_array("latents", latents)
            size = (latents.shape[1] * 8, latents.shape[2] * 8) if latents.ndim == 4 else None
        if image is not None:
            size = checked_image(image, count * num_images_per_prompt)
        inpaint.check_arguments(self.parts.unet, mask_image, size, count * num_images_per_prompt, refiner is not None)
        self.parts.check_clip_skip(clip_skip)
        check_max_tokens(max_tokens)
        decoder = (refiner or self).vae
        check_run(args, self.parts, None if refiner is None else refiner.parts, prompts=count, scheduler=scheduler,
                  sigmas=sigmas,
                  dtype=self.dtype, vae_dtype=decoder.dtype, tiled_vae=decoder.use_tiling, vae_tile=decoder.tile_sample_size,
                  vae_overlap=decoder.tile_overlap, vae_memory_budget=decoder.memory_budget, low_memory=low_memory,
                  image_size=size, release_unet=release_unet, widen_weights=widen_weights is True,
                  quantize=self.quantize, quantize_text_encoders=self.quantize_text_encoders)
        guided = args.guided(self.parts.unet)
        prompt_args = dict(negative_prompt=negative_prompt, prompt_2=prompt_2,
                           negative_prompt_2=negative_prompt_2, clip_skip=clip_skip, guided=guided,
                           prompt_weighting=prompt_weighting, max_tokens=max_tokens)
        # The whole run in one reused heap: the memory the text encoders free is where the UNet
        # loads, and the UNet's where the decode works, instead of fresh pages each time.
        with reused_heap():
            if prompt_embeds is None:
                prompt_embeds = self.encode_prompt(prompt, **prompt_args)
            embeddings = prompt_embeds.repeated(num_images_per_prompt)
            refiner_embeddings = None
            if refiner is not None:  # encoded now, so that no encoder is loaded while a UNet runs
                refiner_embeddings = refiner.encode_prompt(prompt, **prompt_args).repeated(num_images_per_prompt)

            sample = dict(num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=guidance_rescale,
                          height=height, width=width, seed=seed)
            if mask_image is not None:
                batch = embeddings.context.shape[0]
                sample.update(inpainting=inpaint.prepare(self.vae, self.parts.unet, image, mask_image, batch, strength,
                                                         seed), strength=strength)
            elif image is not None:
                sample.update(image_latents=self.encode_image(image, embeddings.context.shape[0], seed),
                              strength=strength)
            run = (low_memory, widen_weights, (scheduler, sigmas), release_unet)
            try:
                x = self._denoise("base", self, embeddings, callback, *run, latents=latents,
                                  denoising_end=refiner_start if refiner is not None else None, **sample)
                if refiner is not None:
                    x = self._denoise("refiner", refiner, refiner_embeddings, callback, *run, image_latents=x,
                                      denoising_start=refiner_start, **sample)
            finally:  # by an exception too
                for pipe in (self, refiner) if release_unet else ():
                    if pipe is not None and pipe._unet is not None:
                        pipe.release_unet()
            if output == "latent":
                return x
            if vae == "tiny":
                return decode(self.tiny_vae, x, as_uint8=output == "uint8")
            return (refiner or self).decode(x, as_uint8=output == "uint8")

    @staticmethod
    def _denoise(stage, pipe: "DiffusionPipeline", e: PromptEmbeddings, callback, low_memory, widen_weights,
                 sampling, released, **kwargs):
        """One stage's denoising; ``released``: the stage's UNet is freed at its end (before a
        refiner's loads, say), so weights widened for it are not narrowed back."""
        sampler = Sampler(pipe.unet, pipe.scheduler(*sampling), low_memory=low_memory, widen_weights=widen_weights,
                          narrow_back=not released)
        x = None
        steps = sampler.steps(e.context, e.pooled, negative_prompt_embeds=e.negative_context,
                              negative_pooled_prompt_embeds=e.negative_pooled, **kwargs)
        # Closed here, not when collected, if the callback raises: the run's settings end with it.
        with closing(steps):
            for step in steps:
                x = step.latents
                if callback is not None:
                    callback(stage, step)
        if released:
            mx.eval(x)
            pipe.release_unet()
        return x

    def encode_image(self, image: np.ndarray | mx.array, batch: int, seed: int | None = None) -> mx.array:
        """Images (1 or ``batch``, H, W, 3), uint8 or floats in [0, 1], -> scaled latents, drawn
        from the VAE's latent distribution as diffusers' img2img does (with a key from ``seed``)."""
        checked_image(image, batch)
        # A key apart from the ones Sampler splits from the same seed for its noise.
        key = None if seed is None else mx.random.split(mx.random.key(seed), 3)[2]
        return batched(encode(self.vae, to_pixels(image), key), batch)

    def decode(self, latents: mx.array, as_uint8: bool = True) -> np.ndarray:
        """Scaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3): uint8, or floats in [0, 1]."""
        return decode(self.vae, latents, as_uint8)


def _load_unet(parts: PipelineFolder, dtype: mx.Dtype, quantize: Quantization | None) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(parts.part("unet"), dtype=dtype, quantize=quantize)


load_pipeline = DiffusionPipeline.from_pretrained

__all__ = ["DiffusionPipeline", "PipelineError", "PromptEmbeddings", "load_pipeline"]
