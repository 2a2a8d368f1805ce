"""Tiny random SD 1.x / 2.x and inpainting pipelines for conversion tests: diffusers pipelines
saved as folders, original single files written from seeded torch models; and the check that a
converted folder's models compute what the reference's do.

Each family's scheduler is the one its published repo ships (``mlx_unet.convert.published``),
built by diffusers.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
)
from original_layout import SINGLE_FILE_FAMILIES, sd_single_file
from reference import make_inputs, relative_error, run_mlx, run_torch, tiny_config, torch_unet
from reference_text import run_torch as run_torch_text
from reference_text import token_ids, torch_text_encoder
from reference_vae import to_numpy, torch_decode, torch_encode, torch_vae
from safetensors.torch import save_file
from tokenizer_files import END, write_clip_tokenizer
from transformers import CLIPTokenizer as TorchCLIPTokenizer

from mlx_unet import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, VAEConfig
from mlx_unet.convert.published import PUBLISHED
from mlx_unet.tokenizer import CLIPTokenizer

# Each family's key in PUBLISHED: (cross-attention width, inpainting).
FAMILY_KEYS = {"sd15": (768, False), "sd15-inpaint": (768, True), "sd2": (1024, False), "sd2-inpaint": (1024, True),
               "sdxl-inpaint": (2048, True)}


def published_scheduler(family: str):
    """The scheduler the family's published repo ships, built by diffusers from our record of it."""
    config = dict(PUBLISHED[FAMILY_KEYS[family]].scheduler)
    cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler,
           "EulerDiscreteScheduler": EulerDiscreteScheduler}[config.pop("_class_name")]
    return cls.from_config(config)


# ---------------------------------------------------------------------- diffusers folders


def _encoder(hidden: int, act: str, seed: int, projection: int | None = None):
    config = CLIPTextConfig.from_preset("sdxl-clip-bigg" if projection else "sdxl-clip-l", hidden_size=hidden,
                                        intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                                        hidden_act=act, **({"projection_dim": projection} if projection else {}))
    return torch_text_encoder(config, seed=seed)


def diffusers_pipeline(tmp, family: str, seed: int):
    """A diffusers pipeline of ``family`` with tiny random components, saved: (pipeline, folder).
    The VAE's force_upcast is off, so that its float16 default can be seen to apply."""
    tokenizer = TorchCLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "tok", END if family != "sd2" else "!"))
    vae = torch_vae(VAEConfig.from_preset("tiny", sample_size=32), seed=seed + 3)
    common = {"vae": vae, "unet": torch_unet(tiny_config(family), seed=seed), "scheduler": published_scheduler(family)}
    if family == "sdxl-inpaint":
        tokenizer_2 = TorchCLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "tok2", "!"))
        pipe = StableDiffusionXLInpaintPipeline(
            text_encoder=_encoder(16, "quick_gelu", seed + 1), text_encoder_2=_encoder(32, "gelu", seed + 2, 40),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, requires_aesthetics_score=False, **common)
    else:
        width = tiny_config(family).cross_attention_dim
        cls = sd_pipeline_class(family)
        pipe = cls(text_encoder=_encoder(width, "gelu" if family == "sd2" else "quick_gelu", seed + 1),
                   tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                   **common)
    pipe.save_pretrained(tmp / "pipe")
    return pipe, tmp / "pipe"


def models_of(pipe) -> dict:
    names = ("unet", "text_encoder", "text_encoder_2", "vae")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def sd_pipeline_class(family: str) -> type:
    return StableDiffusionInpaintPipeline if family.endswith("inpaint") else StableDiffusionPipeline


# ---------------------------------------------------------------------- original single files
# Cross-attention and text widths stay at each family's real values (the family is told by them);
# depths and the other widths are cut.


VAE = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}
SD_TEXT = {"vocab_size": 300, "intermediate_size": 64}


def single_file_text_config(family: str) -> tuple[CLIPTextConfig, CLIPTextConfig | None]:
    """(the text encoder as converted, the OpenCLIP tower the SD 2.x file stores: one layer more, and
    a projection, neither of which SD 2.x uses)."""
    if family.startswith("sd2"):
        return tuple(CLIPTextConfig.from_preset("sd2-clip-h", num_hidden_layers=n, **SD_TEXT) for n in (2, 3))
    return CLIPTextConfig.from_preset("sdxl-clip-l", num_hidden_layers=2, **SD_TEXT), None


def write_sd_single_file(tmp, family: str):
    """An ldm single file of ``family`` written from seeded torch models: (its path, the models as
    converted, by our component names, and their configs)."""
    published = PUBLISHED[FAMILY_KEYS[family]]
    text, tower = single_file_text_config(family)
    configs = {"unet": SINGLE_FILE_FAMILIES[family], "text_encoder": text,
               "vae": VAEConfig.from_preset("sdxl", **VAE, **published.vae)}
    models = {"unet": torch_unet(configs["unet"], seed=20), "vae": torch_vae(configs["vae"], seed=22)}
    stored = torch_text_encoder(tower or text, seed=21)
    if tower is not None:  # SD 2.x's text encoder: the tower's first layers, as diffusers loads them
        models["text_encoder"] = torch_text_encoder(text)
        models["text_encoder"].load_state_dict(
            {k: v for k, v in stored.state_dict().items() if k in models["text_encoder"].state_dict()})
    else:
        models["text_encoder"] = stored
    tensors = sd_single_file(models["unet"].state_dict(), configs["unet"], stored.state_dict(),
                             models["vae"].state_dict(), open_clip=tower is not None)
    path = tmp / f"{family}.safetensors"
    save_file(tensors, str(path))
    return path, models, configs


# ---------------------------------------------------------------------- checks
FP32 = 1e-4  # relative, float32
PROMPTS = ["a photo of a cat, rainbow!!", "", "<|endoftext|> two  spaces ! more"]


def assert_models_compute_the_same(out, pipe):
    """Our UNet, text encoder(s) and VAE loaded from ``out`` against the pipeline's, on one input each."""
    unet = UNet2DConditionModel.from_pretrained(out / "unet", dtype=mx.float32)
    inputs = make_inputs(unet.config, 2, 16, 16, seed=1, timesteps=[20.0, 700.0])
    assert relative_error(run_mlx(unet, inputs), run_torch(pipe.unet, inputs)) <= FP32
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is None:
            continue
        ours = CLIPTextModel.from_pretrained(out / name, dtype=mx.float32)
        ids = token_ids(ours.config, 2, 77, seed=2) % ours.config.vocab_size  # (the tiny vocabularies)
        hidden, pooled = ours(mx.array(ids), hidden_layer=-2)
        their_states, their_pooled = run_torch_text(getattr(pipe, name), ids)
        assert relative_error(np.array(hidden), their_states[-2]) <= FP32, name
        assert relative_error(np.array(pooled), their_pooled) <= FP32, name
    vae = AutoencoderKL.from_pretrained(out / "vae", dtype=mx.float32)
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((1, 4, 4, 4), dtype=np.float32)
    assert relative_error(to_numpy(vae.decode(mx.array(latents))), torch_decode(pipe.vae, latents)) <= FP32
    images = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    assert relative_error(to_numpy(vae.encode(mx.array(images)).mean), torch_encode(pipe.vae, images)[0]) <= FP32


def assert_tokenizes_the_same(out, pipe):
    for name in ("tokenizer", "tokenizer_2"):
        theirs = getattr(pipe, name, None)
        if theirs is not None:
            expected = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
            assert CLIPTokenizer.from_folder(out / name)(PROMPTS).tolist() == expected, name
