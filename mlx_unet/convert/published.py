"""What each family's published diffusers repo ships that its original single file cannot show:
the pipeline class, the scheduler config, the VAE's latent scaling and tile size, and the pad
token of each tokenizer. A single file is written out with its family's values.

The repos are the ones diffusers' ``from_single_file`` takes its configs from for a file of that
family (``DIFFUSERS_DEFAULT_PIPELINE_PATHS`` in ``diffusers/loaders/single_file_utils.py``, picked
by ``infer_diffusers_model_type``); each value below is that repo's file as published (the
scheduler's ``scheduler/scheduler_config.json``, the VAE's ``vae/config.json``, where an absent
field takes diffusers' default, the tokenizers' ``special_tokens_map.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ..configs.base import FORMAT_KEY, FORMAT_VERSION
from ..configs.unet import UNetConfig
from ..schedulers import SDXL_SCHEDULER_CONFIG
from ..tokenizer import END_OF_TEXT
from .layout import MODELS, TOKENIZERS, UNET

# CLIP ViT-L's tokenizers pad with END_OF_TEXT (SD 1.x, SDXL's first); the OpenCLIP ones (SD 2.x,
# SDXL's second) with id 0, "!".
EXCLAMATION = "!"

# The noise schedule every SD 1.x / 2.x repo's scheduler config carries (diffusers 0.6-0.10 wrote
# them; no timestep_spacing, so each scheduler class takes its own default, as in diffusers).
_SD_SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@dataclass(frozen=True)
class Published:
    """One family's published pipeline, as a single file of it is written out."""

    repo: str  # where the values come from
    pipeline: str  # model_index.json's _class_name
    scheduler: dict[str, Any]  # scheduler_config.json, _class_name first
    vae: dict[str, Any]  # the VAE config fields the tensors do not show
    pads: dict[str, str]  # tokenizer folder -> its pad token
    settings: dict[str, Any] = field(default_factory=dict)  # the pipeline's own model_index.json entries

    @property
    def sdxl(self) -> bool:
        return "tokenizer_2" in self.pads

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")  # every diffusers scheduler's default

    def model_index(self, models: Iterable[str]) -> dict[str, Any]:
        """model_index.json of a converted pipeline of ``models``, as the published repo has it:
        SDXL pipelines list both text encoder slots (a refiner's first as null), SD pipelines their one."""
        index = {"_class_name": self.pipeline, **self.settings, "scheduler": ["diffusers", self.scheduler["_class_name"]]}
        for encoder, tokenizer in TOKENIZERS.items():
            if self.sdxl or tokenizer in self.pads:
                present = encoder in models
                index[encoder] = ["transformers", MODELS[encoder].classes[0]] if present else [None, None]
                index[tokenizer] = ["transformers", "CLIPTokenizer"] if present else [None, None]
        return {**index, "unet": ["diffusers", UNET.classes[0]], "vae": ["diffusers", MODELS["vae"].classes[0]],
                FORMAT_KEY: FORMAT_VERSION}


def _sd(repo: str, pipeline: str, scheduler: str, sample_size: int, pad: str, prediction_type: str | None = None):
    schedule = {"_class_name": scheduler, **_SD_SCHEDULE}
    if prediction_type is not None:  # the SD 2.x repos write it; the SD 1.x ones leave it to the default
        schedule["prediction_type"] = prediction_type
    vae = {"scaling_factor": 0.18215, "sample_size": sample_size}
    return Published(repo, pipeline, schedule, vae, {"tokenizer": pad})


def _sdxl(repo: str, pipeline: str, settings: dict[str, Any], encoders: tuple[str, ...]):
    vae = {"scaling_factor": 0.13025, "sample_size": 1024}
    pads = {"tokenizer": END_OF_TEXT, "tokenizer_2": EXCLAMATION}
    return Published(repo, pipeline, {"_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULER_CONFIG}, vae,
                     {t: pads[t] for t in encoders}, settings)


# (UNet cross-attention width, 9-channel inpainting UNet) -> the family's published pipeline.
# diffusers cannot tell SD 2.x's epsilon models (512 base) from its v-prediction ones (768) by the
# weights: like from_single_file, a non-inpainting SD 2.x file takes SD 2.1's v-prediction.
PUBLISHED: dict[tuple[int, bool], Published] = {
    (768, False): _sd("stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline", "PNDMScheduler",
                      512, END_OF_TEXT),
    (768, True): _sd("stable-diffusion-v1-5/stable-diffusion-inpainting", "StableDiffusionInpaintPipeline",
                     "DDIMScheduler", 512, END_OF_TEXT),
    (1024, False): _sd("stabilityai/stable-diffusion-2-1", "StableDiffusionPipeline", "DDIMScheduler", 768,
                       EXCLAMATION, "v_prediction"),
    (1024, True): _sd("stabilityai/stable-diffusion-2-inpainting", "StableDiffusionInpaintPipeline", "PNDMScheduler",
                      512, EXCLAMATION, "epsilon"),
    # The base conditions an empty negative prompt on zeros; the refiner encodes it, and scores aesthetics.
    (2048, False): _sdxl("stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline",
                         {"force_zeros_for_empty_prompt": True}, ("tokenizer", "tokenizer_2")),
    (2048, True): _sdxl("diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "StableDiffusionXLInpaintPipeline",
                        {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
                        ("tokenizer", "tokenizer_2")),
    (1280, False): _sdxl("stabilityai/stable-diffusion-xl-refiner-1.0", "StableDiffusionXLImg2ImgPipeline",
                         {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}, ("tokenizer_2",)),
}


SDXL_BASE = PUBLISHED[(2048, False)]


def published(unet: UNetConfig) -> Published | None:
    """The published pipeline of ``unet``'s family; None for a UNet of no known family."""
    return PUBLISHED.get((unet.cross_attention_dim, unet.in_channels == 9))
