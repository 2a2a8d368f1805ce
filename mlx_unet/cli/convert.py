"""``convert``: a Stable Diffusion checkpoint to an MLX model folder, from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..configs.base import DTYPES
from ..convert import convert
from ..convert.writer import PREDICTION_TYPES
from .common import ArgumentParser, add_quantization_arguments, quantization_arguments, run_command


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="mlx-unet convert",
        description="Convert a Stable Diffusion 1.x, 2.x or XL checkpoint to an MLX model folder. By default the "
        "whole pipeline (text-to-image, img2img or inpainting; SDXL's refiner): unet/, vae/, text_encoder/ "
        "(SDXL: and text_encoder_2/; a refiner has only that one), each config.json + model.safetensors, their "
        "tokenizer folders, scheduler/ and model_index.json, for mlx_unet's pipelines. With --unet-only, the UNet "
        "alone (config.json + model.safetensors), for mlx_unet.UNet2DConditionModel.from_pretrained; a source "
        "that holds only a UNet is converted so too, and so is a tiny VAE (diffusers' AutoencoderTiny: "
        "madebyollin/taesd, madebyollin/taesdxl), for mlx_unet.AutoencoderTiny.from_pretrained and generate's "
        "--tiny-vae.",
        epilog="SOURCE is a Hub repo id (stabilityai/stable-diffusion-xl-base-1.0), a diffusers folder "
        "(a pipeline root, or a UNet folder), or an original single-file checkpoint (v1-5-pruned.safetensors, "
        "v2-1_768-ema-pruned.safetensors, sd_xl_base_1.0.safetensors, ...; its tokenizers are written from CLIP's "
        "vocabulary, which ships with mlx-unet, and its scheduler config is its family's published one). "
        "Set HF_HUB_OFFLINE=1 to use only the Hugging Face cache.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.add_argument("--dtype", choices=list(DTYPES), default="float16",
                   help="output dtype of the UNet and text encoders (default: float16)")
    p.add_argument("--vae-dtype", choices=list(DTYPES),
                   help="output dtype of the VAE (default: float32, since SDXL's VAE overflows float16 and VAE "
                   "configs say force_upcast, SD 1.x / 2.x ones by diffusers' default; the --dtype value when the "
                   "VAE's config says force_upcast: false, as the fp16-fix VAE's does; a tiny VAE: the --dtype value)")
    p.add_argument("--unet-only", action="store_true",
                   help="convert only the UNet, into OUT_DIR/config.json + OUT_DIR/model.safetensors")
    p.add_argument("--tokenizers", metavar="SOURCE",
                   help="a diffusers pipeline folder or Hub repo id of the same family to copy tokenizer/ (and "
                   "tokenizer_2/) from (default: the SOURCE pipeline's own; for single files, CLIP's vocabulary "
                   "that ships with mlx-unet)")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                   help="what the UNet predicts, written into the scheduler config (default: the source's; for "
                   "single files their family's: v_prediction for SD 2.x, as diffusers assumes, since the "
                   "weights cannot tell; pass epsilon for an SD 2.x 512 base model)")
    p.add_argument("--variant", help="diffusers weights variant to read, e.g. fp16 (default: fp16 for a "
                   "float16 output when the source has it)")
    p.add_argument("--revision", help="Hub branch, tag or commit of SOURCE (default: main)")
    p.add_argument("--link", action="store_true",
                   help="write each model that converting leaves value for value as the source stores it "
                   "(safetensors weights in their own dtype, or float16 / bfloat16 ones in a float32 model) as a "
                   "table of where its tensors lie in SOURCE, not as a copy: a folder of a few MB that reads SOURCE "
                   "as it loads, so SOURCE must stay where it is, unchanged (a moved or changed source is refused "
                   "when the folder loads: convert again then). What is rounded or quantized is copied")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--ema", action="store_true", help="single files: use the UNet's EMA weights when the file has them")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .ckpt/.bin/.pt pickles (loaded with torch.load(weights_only=True); needs torch)")
    p.add_argument("--config", type=Path, help="a diffusers UNet config.json to use instead of the source's or the inferred one")
    add_quantization_arguments(p.add_argument_group(
        "quantization", "Write the UNet (and by default the text encoders) with the Linear layers that "
        "mlx_unet.quantize's policy takes quantized, each as it is written; convolutions and the VAE stay dense. "
        "The folder loads quantized with no dense copy; its config.json files record the settings."),
        "in the output")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        quantize, text = quantization_arguments(args)  # checked before anything is read
        # Not given: None, the default, which convert() applies where the output has text encoders
        # (and refuses with --unet-only only when given); "none": False, dense.
        text = None if args.quantize_text_encoders is None else text or False
        convert(args.source, args.out_dir, dtype=args.dtype, variant=args.variant, revision=args.revision,
                force=args.force, ema=args.ema, allow_pickle=args.allow_pickle, config=args.config,
                progress=not args.quiet, unet_only=args.unet_only, vae_dtype=args.vae_dtype, tokenizers=args.tokenizers,
                quantize=quantize, quantize_text_encoders=text, prediction_type=args.prediction_type, link=args.link)
        return 0

    return run_command(run, lambda: "nothing was written")
