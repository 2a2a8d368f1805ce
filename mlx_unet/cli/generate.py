"""Text to image from the command line:

    mlx-unet generate "a photo of an astronaut riding a horse" --model models/sdxl -o out.png

--model is a pipeline folder written by `mlx-unet convert` (from a Hub repo id, a diffusers
folder or an original single file, converted whole). Several images (--batch-size) are written
as out.png, out-1.png, ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..configs.base import DTYPES
from ..errors import InputError
from ..lora import read_lora
from ..lora.apply import checked_scale
from ..pipelines.arguments import RunArguments
from ..pipelines.folder import PipelineFolder
from ..pipelines.images import check_writable, output_paths, write_pngs
from ..pipelines.memory import command_tile
from ..pipelines.preflight import check_prompts, check_run
from ..pipelines.sdxl import SDXLPipeline
from ..schedulers import SAMPLERS
from .common import ArgumentParser, add_quantization_arguments, quantization_arguments, run_command


class Progress:
    """One line per stage on stderr: a bar, steps done, seconds per step."""

    def __init__(self, enabled: bool, stream=sys.stderr):
        self.enabled = enabled
        self.stream = stream
        self.seconds: dict[str, list[float]] = {}

    def __call__(self, stage: str, step) -> None:
        self.seconds.setdefault(stage, []).append(step.seconds)
        if not self.enabled:
            return
        done = step.index + 1
        bar = "#" * (24 * done // step.total)
        end = "\n" if done == step.total else ""
        self.stream.write(f"\r{stage:8s} [{bar:24s}] {done}/{step.total}  {step.seconds:.2f} s/step{end}")
        self.stream.flush()


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx-unet generate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", type=Path, required=True, help="converted pipeline folder (mlx-unet convert's output)")
    p.add_argument("-o", "--output", type=Path, default=Path("image.png"), help="PNG to write (default: image.png)")
    p.add_argument("--negative-prompt", help="what to steer away from (default: none; SDXL then guides against zeros)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale; <= 1 disables it (default: 5)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's, 1024 for SDXL)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--seed", type=int, help="random seed (default: drawn and printed)")
    p.add_argument("--scheduler", choices=list(SAMPLERS), help="sampler (default: the one the model ships with)")
    p.add_argument("-n", "--batch-size", type=int, default=1, help="images to make (default: 1)")
    p.add_argument("--refiner", type=Path, help="converted SDXL refiner folder: it finishes the last part of the schedule")
    p.add_argument("--refiner-start", type=float, default=0.8,
                   help="fraction of the schedule after which the refiner takes over (default: 0.8)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16", help="UNet and text encoder precision (default: float16)")
    p.add_argument("--vae-dtype", choices=list(DTYPES),
                   help="VAE precision (default: float32, or the weights' when the VAE is safe in float16)")
    p.add_argument("--tile-vae", action="store_true",
                   help="decode in tiles of 256 px (the VAE's own size where smaller): less memory for large images")
    p.add_argument("--low-memory", action="store_true", help="for 8-16 GB machines: UNet block by block, guidance halves in turn")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA / LyCORIS file, folder or Hub repo id, at strength SCALE (default 1); repeatable; "
                        "applied to the base model only when a refiner is given")
    p.add_argument("--lora-mode", choices=("fuse", "live"),
                   help="fuse: add LoRAs into the weights (no cost per step); live: run them beside each layer "
                        "(default: fuse, or live where the UNet is quantized)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .ckpt/.pt/.bin LoRA pickles (loaded with torch.load(weights_only=True); needs torch)")
    add_quantization_arguments(p, "as it loads")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _lora_spec(spec: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (FILE, SCALE); a colon not followed by a number is part of the name."""
    source, colon, tail = spec.rpartition(":")
    if colon:
        try:
            return source, float(tail)
        except ValueError:
            pass
    return spec, 1.0


# The API's name of each option whose flag differs, for the messages of the shared checks.
_FLAGS = (("steps", "--steps"), ("guidance", "--guidance"), ("height", "--height"), ("width", "--width"),
          ("num_images_per_prompt", "--batch-size"), ("seed", "--seed"), ("refiner_start", "--refiner-start"))


def _checked(args) -> tuple[RunArguments, list[Path]]:
    """The run's numbers and output paths, checked before anything is read."""
    run = RunArguments(args.steps, args.guidance, 0.0, args.height, args.width, args.batch_size, args.seed,
                       refiner_start=args.refiner_start, refined=args.refiner is not None, flags=_FLAGS)
    check_prompts(args.prompt)
    if args.negative_prompt is not None:
        check_prompts(args.negative_prompt, "--negative-prompt")
    return run, output_paths(args.output, args.batch_size)


def _generate(args, log, written: list[Path]) -> int:
    start = time.perf_counter()
    run, paths = _checked(args)
    quantize, quantize_text = quantization_arguments(args)
    dtype = DTYPES[args.dtype]
    vae_dtype = DTYPES[args.vae_dtype] if args.vae_dtype else None
    base = PipelineFolder.read(args.model)
    refiner_parts = PipelineFolder.read(args.refiner) if args.refiner is not None else None
    tile = command_tile((refiner_parts or base).vae)
    plan = check_run(run, base, refiner_parts, prompts=1, scheduler=args.scheduler, dtype=dtype, vae_dtype=vae_dtype,
                     tiled_vae=args.tile_vae, vae_tile=tile, low_memory=args.low_memory, quantize=quantize,
                     quantize_text_encoders=quantize_text)
    unet_quantization = base.quantization("unet", quantize)
    # LoRAs go live where the UNet is quantized: fusing into quantized weights is refused.
    lora_mode = args.lora_mode or ("live" if unet_quantization else "fuse")
    if args.lora and lora_mode == "fuse" and unet_quantization:
        raise InputError("--lora-mode fuse cannot fuse LoRAs into a quantized UNet (it would round them away); "
                         "use --lora-mode live, the default for quantized models.")
    check_writable(paths, plan.height, plan.width)  # before loading: a failed write would waste the run
    adapters = []  # read and checked before the models load
    for source, scale in map(_lora_spec, args.lora):
        adapters.append((read_lora(source, allow_pickle=args.allow_pickle), checked_scale(scale)))
    seed = run.seed if run.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    quantized = dict(quantize=quantize, quantize_text_encoders=quantize_text if quantize_text else False)
    pipe = SDXLPipeline.from_pretrained(base, dtype=dtype, vae_dtype=vae_dtype, **quantized)
    refiner = SDXLPipeline.from_pretrained(refiner_parts, dtype=dtype, vae_dtype=vae_dtype, **quantized) \
        if refiner_parts else None
    if args.tile_vae:
        (refiner or pipe).vae.enable_tiling(tile)
    log(f"loaded {args.model} in {time.perf_counter() - start:.1f} s; seed {seed}; "
        f"estimated peak memory {plan.estimate.peak / 2**30:.2f} GiB")
    for part, q in (("UNet", unet_quantization),
                    ("text encoders", base.quantization("text_encoder_2", quantize_text))):
        if q is not None:
            log(f"{part}: {q.describe()}")
    for lora, scale in adapters:
        pipe.load_lora(lora, scale, fuse=lora_mode == "fuse")
        log(f"LoRA {lora.describe()}; scale {scale:g}, {'fused' if lora_mode == 'fuse' else 'live'}")
    progress = Progress(not args.quiet)
    images = pipe(args.prompt, args.negative_prompt, steps=run.steps, guidance=run.guidance, height=run.height,
                  width=run.width, num_images_per_prompt=run.num_images_per_prompt, seed=seed,
                  scheduler=args.scheduler, refiner=refiner, refiner_start=run.refiner_start,
                  low_memory=args.low_memory, callback=progress)
    write_pngs(paths, images)
    written += paths
    for stage, seconds in progress.seconds.items():
        # The first step includes one-time work (kernel builds, weight reads): the median is typical.
        log(f"{stage}: {len(seconds)} steps, median {np.median(seconds):.2f} s/step")
    log(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.1f} s; "
        f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    written: list[Path] = []
    return run_command(lambda: _generate(args, log, written),
                       lambda: f"wrote {', '.join(map(str, written))}" if written else "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
