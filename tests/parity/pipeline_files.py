"""Tiny random SDXL pipelines on disk: diffusers' StableDiffusionXLPipeline (and the refiner's
img2img pipeline) of small random components, saved, and converted whole by our converter."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from reference import init_every_parameter, tiny_config, torch_unet
from tokenizer_files import write_clip_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from mlx_unet.convert import convert
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG

SIZE = 64  # pixels; 8x8 latents
VAE_TILE = 32  # pixels: the VAE's sample_size, so that tiled decoding of a SIZE image has tiles


def text_encoder(cls, seed: int, **fields):
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **fields)
    model = cls(config)
    init_every_parameter(model, seed)
    return model.eval()


def tiny_vae(seed: int, scaling_factor: float = 0.13025) -> AutoencoderKL:
    # Four levels: the 8x pixel-to-latent scale of every SD VAE.
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=VAE_TILE, scaling_factor=scaling_factor)
    init_every_parameter(vae, seed)
    # Random decoder weights blow values up level by level; a smaller output conv keeps the image
    # inside [-1, 1] mostly, so that the comparison is not of clamped saturated pixels.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
        vae.decoder.conv_out.bias.mul_(0.2)
    return vae.eval()


def diffusers_pipeline(tmp: Path, refiner: bool):
    """A diffusers SDXL (or refiner) pipeline of tiny random components, saved under ``tmp``:
    (the pipeline, its folder)."""
    seed = 70 if not refiner else 80
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    encoder_2 = text_encoder(CLIPTextModelWithProjection, seed + 2, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu", projection_dim=40)
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "tok2", pad_token="!"))
    if refiner:
        unet = torch_unet(tiny_config("sdxl-refiner", cross_attention_dim=32,
                                      projection_class_embeddings_input_dim=40 + 5 * 8), seed=seed)
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=tiny_vae(seed + 3), text_encoder=None, text_encoder_2=encoder_2, tokenizer=None,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
    else:
        # cross-attention width = 16 + 32 (the two encoders' states side by side); pooled 40.
        encoder = text_encoder(CLIPTextModel, seed + 1, hidden_size=16, intermediate_size=32,
                                num_hidden_layers=3, num_attention_heads=2, hidden_act="quick_gelu")
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "tok1"))
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(seed + 3), text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=torch_unet(tiny_config("sdxl-base"), seed=seed), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp / ("diffusers-refiner" if refiner else "diffusers")
    pipe.save_pretrained(folder)  # (transformers 5 saves tokenizers as tokenizer.json: converted too)
    return pipe, folder


def converted_pipelines(tmp: Path, dtype: str = "float32") -> dict:
    """Base and refiner, in diffusers (``base``, ``refiner``: the pipelines; ``diffusers``: the
    base's folder) and converted with ``dtype`` (``mlx``, ``mlx_refiner``: the folders)."""
    base, base_folder = diffusers_pipeline(tmp, refiner=False)
    refiner, refiner_folder = diffusers_pipeline(tmp, refiner=True)
    convert(base_folder, tmp / "mlx", dtype=dtype, progress=False)
    convert(refiner_folder, tmp / "mlx-refiner", dtype=dtype, progress=False)
    return {"base": base, "refiner": refiner, "diffusers": base_folder, "mlx": tmp / "mlx",
            "mlx_refiner": tmp / "mlx-refiner"}
