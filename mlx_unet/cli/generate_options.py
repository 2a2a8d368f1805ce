"""``mlx-unet generate``'s options: how the command is asked for images, and what it is asked
(the defaults, under what a --from-png image records, under the options typed). The text below
is its --help.

Make PNGs from prompts (text to image), from an image (img2img) and from an image with a mask
(inpainting), with an SD 1.x, 2.x or XL model.

examples:
    mlx-unet generate --demo                                         # a tiny random model: no download
    mlx-unet generate "an astronaut riding a horse" --model stabilityai/stable-diffusion-xl-base-1.0
    mlx-unet generate "a watercolour" --model models/sd15 --image photo.jpg --strength 0.6
    mlx-unet generate "a red door" --model models/sdxl --image house.png --mask door.png
    mlx-unet generate --from-png image.png --seed 8                 # rerun what made image.png, one flag changed

--model takes a pipeline folder written by `mlx-unet convert`, or what it converts (a Hub repo
id, a diffusers folder, an original single file), converted once into the cache
($MLX_UNET_CACHE, default ~/.cache/mlx-unet) and reused. Several images (-n, --prompts) are
written as out.png, out-1.png, ...: -n N with --seed S gives each prompt the seeds S, S+1, ...,
S+N-1. Every PNG records what made it (a `parameters` text chunk in the form other SD tools
read, and the exact settings for --from-png, which reproduces it bit for bit on the same machine
and versions).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .. import demo
from ..configs.base import DTYPES
from ..convert.writer import PREDICTION_TYPES
from ..errors import InputError
from ..pipelines.arguments import IMG2IMG_STRENGTH, INPAINT_STRENGTH, SEED_LIMIT
from ..pipelines.preflight import check_prompts
from ..pipelines.run import NARROW_BACK_FORWARDS, WIDEN_FROM_FORWARDS
from ..schedulers import SAMPLERS
from ..schedulers.names import sampler_name
from ..schedulers.sigmas import SIGMA_SCHEDULES
from . import png_record
from .common import ArgumentParser, add_quantization_arguments

_HELP = __doc__.split("\n\n", 1)[1]  # the command's help: this docstring past its first paragraph

# The API's default strength (DiffusionPipeline.__call__): img2img's, and inpainting's.
STRENGTH = {"img2img": IMG2IMG_STRENGTH, "inpaint": INPAINT_STRENGTH}



def build_parser(parser_class: type[argparse.ArgumentParser] = ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog="mlx-unet generate", description=_HELP.split("\n\n")[0],
                     epilog=_HELP.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="what to draw (or --prompts FILE, or the prompt --from-png reads)")
    source = p.add_argument_group("model")
    source.add_argument("--model", help="a converted pipeline folder, a diffusers folder, an original single file "
                                        "or a Hub repo id (converted once into the cache)")
    source.add_argument("--demo", action="store_true",
                        help="a tiny random pipeline made on the fly: no --model, no download, seconds on a CPU")
    source.add_argument("--unet", metavar="UNET",
                        help="a UNet to run in place of --model's: a distilled one such as SDXL-Lightning's or "
                             "Hyper-SD's (a diffusers-layout weights file takes --model's config), converted for "
                             "the run, or a folder written by mlx-unet convert --unet-only")
    source.add_argument("--revision", help="Hub branch, tag or commit of --model (default: main)")
    source.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                        help="what the UNet predicts, where --model is not converted yet (default: the source's; "
                             "single files their family's, v_prediction for SD 2.x: give epsilon for an SD 2.x 512 base)")
    source.add_argument("--no-cache", action="store_true",
                        help="convert --model into a temporary folder, removed after the run, instead of the cache")
    source.add_argument("--refiner", help="an SDXL refiner (as --model): it finishes the last part of the schedule")
    source.add_argument("--refiner-start", type=float, default=0.8,
                        help="fraction of the schedule after which the refiner takes over (default: 0.8)")
    prompts = p.add_argument_group("prompts and images")
    prompts.add_argument("--prompts", type=Path, metavar="FILE",
                         help="a UTF-8 text file of prompts, one a line (blank lines skipped), each making -n images")
    prompts.add_argument("--negative-prompt", help="what to steer away from (default: none; SDXL then guides against zeros)")
    prompts.add_argument("--from-png", type=Path, metavar="IMG",
                         help="rerun what made IMG (a PNG of mlx-unet, or another SD tool's common settings); "
                              "options given here replace its settings")
    prompts.add_argument("--image", type=Path,
                         help="img2img: start from this image (PNG, JPEG, WebP, ...); sizes not multiples of 8 are "
                              "resized down to one, and to --height/--width where given")
    prompts.add_argument("--mask", type=Path,
                         help="inpainting, with --image: white where the image is repainted, black where it is kept; "
                              "the image's size")
    prompts.add_argument("--strength", type=float,
                         help="how much of --image is redrawn, above 0 to 1 (default: 0.3; 1 with --mask)")
    prompts.add_argument("-o", "--output", type=Path, default=Path("image.png"),
                         help="PNG to write (default: image.png); more images: image-1.png, ...")
    run = p.add_argument_group("sampling")
    run.add_argument("--steps", type=int, help="denoising steps (default: 30, a few-step model's own count, "
                                               "10 with --demo)")
    run.add_argument("--guidance", type=float,
                     help="classifier-free guidance scale; <= 1 disables it and runs one UNet pass a step (default: "
                          "5, a few-step model's own: 0 for Turbo and Lightning, 1 for LCM-LoRA)")
    run.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's, "
                                                "or --image's)")
    run.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's, or --image's)")
    run.add_argument("--seed", type=int, help="random seed of the first image; -n N gives it and the N-1 after "
                                              "(default: drawn and printed)")
    run.add_argument("-n", "--batch-size", type=int, default=1, help="images per prompt, one seed each (default: 1)")
    run.add_argument("--scheduler", type=_sampler, metavar="SAMPLER",
                     help=f"sampler: {', '.join(SAMPLERS)}; web UI and ComfyUI names work too ('DPM++ 2M Karras', "
                          "'euler_ancestral') (default: the one the model ships with, or a few-step model's own)")
    run.add_argument("--sigmas", choices=SIGMA_SCHEDULES,
                     help="sigma schedule for samplers that take one: karras, exponential, beta, ays (Align Your "
                          "Steps, SD 1.x and SDXL), default (the config's spacing) (default: the model's config)")
    prompts.add_argument("--no-prompt-weighting", action="store_true",
                         help="read (, ), [, ] and BREAK as text, not as the web UI's emphasis syntax "
                              "('(word:1.3)', '((word))', '[word]')")
    prompts.add_argument("--max-tokens", type=int, choices=(77,),
                         help="cut prompts at CLIP's 77 tokens, with a warning, instead of encoding longer ones in "
                              "chunks of 75")
    run.add_argument("--clip-skip", type=int,
                     help="condition on the text encoder's states this many layers before the usual one "
                          "(diffusers' clip_skip; the web UI's 'Clip skip' is this plus 1)")
    run.add_argument("--dtype", choices=list(DTYPES), default="float16",
                     help="UNet and text encoder precision (default: float16)")
    run.add_argument("--vae-dtype", choices=list(DTYPES),
                     help="VAE precision (default: float32, or the weights' when the VAE is safe in float16)")
    tiling = run.add_mutually_exclusive_group()
    tiling.add_argument("--tile-vae", action="store_true",
                        help="always decode in tiles of 256 px (the VAE's own size where smaller): least memory "
                             "(default: tiles only where the whole decode would not fit, see --vae-memory-budget)")
    tiling.add_argument("--no-tile-vae", action="store_true",
                        help="decode whole even where the memory estimate says it needs tiles")
    run.add_argument("--vae-memory-budget", type=float, metavar="GIB",
                     help="decode in tiles when a whole decode is estimated to need more than GIB GiB (default: "
                          "the memory still free when the decode starts)")
    run.add_argument("--low-memory", action="store_true",
                     help="for 8-16 GB machines: UNet block by block, guidance halves in turn")
    widening = run.add_mutually_exclusive_group()
    widening.add_argument("--widen-weights", action="store_true",
                          help="on the CPU, hold a float16 / bfloat16 UNet in float32 while it denoises: quicker "
                               f"steps at float32's memory (default: in runs of {WIDEN_FROM_FORWARDS} steps or more, "
                               f"{WIDEN_FROM_FORWARDS + NARROW_BACK_FORWARDS} for each image before the last, where "
                               "that fits)")
    widening.add_argument("--no-widen-weights", action="store_true",
                          help="on the CPU, keep a float16 / bfloat16 UNet in half precision throughout, each weight "
                               "widened to float32 as it is used: least memory")
    draft = p.add_argument_group("previews and drafts")
    draft.add_argument("--vae", choices=("full", "tiny"),
                       help="the VAE that decodes the image: full (default), or tiny (TAESD / TAESDXL: a fraction of "
                            "the time and memory, for drafts, with less fine detail)")
    draft.add_argument("--tiny-vae", metavar="SOURCE",
                       help="the tiny VAE of --vae tiny and --preview-every: a folder (diffusers' AutoencoderTiny, or "
                            "one mlx-unet convert wrote) or a Hub repo id (default: madebyollin/taesdxl for SDXL "
                            "models, madebyollin/taesd for SD 1.x / 2.x)")
    draft.add_argument("--preview-every", type=int, metavar="N",
                       help="every N steps (and at the last), write the image so far, decoded by the tiny VAE, to "
                            "--preview")
    draft.add_argument("--preview", type=Path, metavar="PATH.png",
                       help="the PNG --preview-every writes, replaced at each preview (default: OUTPUT's name with "
                            ".preview.png, beside it)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                      help="a LoRA / LyCORIS file, folder or Hub repo id, at strength SCALE (default 1); repeatable; "
                           "applied to the base model only when a refiner is given")
    lora.add_argument("--lora-mode", choices=("fuse", "live"),
                      help="fuse: add LoRAs into the weights (no cost per step); live: run them beside each layer "
                           "(default: fuse, or live where the UNet is quantized)")
    lora.add_argument("--allow-pickle", action="store_true",
                      help="accept .ckpt/.pt/.bin pickles (loaded with torch.load(weights_only=True); needs torch)")
    add_quantization_arguments(p.add_argument_group("quantization"), "as it loads")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _sampler(name: str) -> str:
    """--scheduler's value, checked: a sampler in any known spelling."""
    try:
        sampler_name(name)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).rstrip(".")) from None
    return name


def without_defaults(parser_class: type[argparse.ArgumentParser] = ArgumentParser) -> argparse.ArgumentParser:
    """The parser, with each option absent from its result unless given: to tell what was typed."""
    parser = build_parser(parser_class)
    # No public argparse call does this: set_defaults(x=SUPPRESS) makes argparse parse the
    # SUPPRESS marker as a value of a typed option.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def lora_spec(spec: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (FILE, SCALE); a colon not followed by a number is part of the name."""
    source, colon, tail = spec.rpartition(":")
    if colon:
        try:
            return source, float(tail)
        except ValueError:
            pass
    return spec, 1.0


# The API's name of each option whose flag differs, for the messages of the shared checks.
FLAGS = (("steps", "--steps"), ("guidance", "--guidance"), ("height", "--height"), ("width", "--width"),
         ("num_images_per_prompt", "--batch-size"), ("seed", "--seed"), ("refiner_start", "--refiner-start"),
         ("strength", "--strength"))


# ---------------------------------------------------------------------------------- settings

def merged_settings(given: dict[str, Any]) -> tuple[argparse.Namespace, png_record.Recorded | None]:
    """The run's settings: the defaults, under what --from-png's image records, under the options
    ``given``; and what that image records."""
    defaults = vars(build_parser().parse_args([]))
    if "prompt" in given and "prompts" in given:
        raise InputError("give a prompt or --prompts FILE, not both.")
    recorded, from_png = None, {}
    if "from_png" in given:
        known = set(defaults) - png_record.UNRECORDED
        recorded = png_record.settings_from_png(given["from_png"], without_defaults, known)
        # What is given replaces what is recorded of the same kind: a model of either kind, a prompt
        # of either kind, and an image (the recorded strength goes with the recorded image).
        replaced = {"model": ("model", "demo"), "demo": ("model", "demo"), "prompts": ("prompt",),
                    "image": ("image", "mask")}
        dropped = {name for option in given for name in replaced.get(option, ())}
        from_png = {k: v for k, v in recorded.settings.items() if k not in dropped}
        if "image" not in from_png and "image" not in given:
            from_png.pop("strength", None)
    demo_defaults = demo.RUN_DEFAULTS if {**from_png, **given}.get("demo") else {}
    return argparse.Namespace(**{**defaults, **demo_defaults, **from_png, **given}), recorded


def read_prompts(path: Path) -> list[str]:
    """A prompts file: UTF-8 text (a byte order mark allowed), one prompt a line, blank lines skipped."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"the prompts file {path} {'is a folder' if path.is_dir() else 'does not exist'}; pass a "
                         "text file of prompts, one a line.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"the prompts file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"the prompts file {path} holds no prompt; write one prompt a line.")
    return prompts


def prompts_of(a: argparse.Namespace) -> list[str]:
    """The run's prompts: the prompts file's, the prompt's, or the demo's."""
    if a.prompts is not None:
        return read_prompts(a.prompts)
    if a.prompt is None:
        if a.demo:
            return [demo.PROMPT]
        raise InputError("give a prompt (or --prompts FILE, or --from-png IMG).")
    return check_prompts(a.prompt)


def check_sources(a: argparse.Namespace, recorded: png_record.Recorded | None) -> None:
    """A model to run (one of --model and --demo), and the options that need another present."""
    if a.demo and a.model is not None:
        raise InputError("--demo makes its own model; leave out --model, or --demo.")
    if a.model is None and not a.demo:
        if recorded is not None and recorded.model_name is not None:
            raise InputError(f"{a.from_png} was made by another tool with the model {recorded.model_name!r}; name "
                             "that model with --model.")
        raise InputError("give --model (a converted folder, a diffusers folder, a single file or a Hub repo id), "
                         "or --demo.")
    if a.mask is not None and a.image is None:
        raise InputError("--mask needs --image: the picture whose white-masked part is repainted.")
    if a.strength is not None and a.image is None:
        raise InputError("--strength goes with --image: it says how much of the image is redrawn.")


def seeds_from(seed: int | None, count: int) -> list[int]:
    """Each image's seed: ``seed`` (drawn where None) and the ``count - 1`` after it."""
    first = seed if seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    if first + count > SEED_LIMIT:
        raise InputError(f"--seed {first} with -n {count} runs past the largest seed, 2**64 - 1; give a smaller seed.")
    return [first + i for i in range(count)]


def vae_tiling(a: argparse.Namespace) -> tuple[bool | None, int | None]:
    """The VAE's ``use_tiling`` (True: always, False: never, None: by need) and by-need budget in
    bytes (None: the memory free at the decode), from the tiling options."""
    budget = a.vae_memory_budget
    if budget is None:
        return (True if a.tile_vae else False if a.no_tile_vae else None), None
    if a.tile_vae or a.no_tile_vae:
        raise InputError("--vae-memory-budget decides when to tile the decode, which --tile-vae and --no-tile-vae "
                         "already fix; leave out one of them.")
    if not 0 < budget < 2**20:
        raise InputError(f"--vae-memory-budget must be a positive number of GiB, got {budget}.")
    return None, int(budget * 2**30)


def widen_weights(a: argparse.Namespace) -> bool | None:
    """The run's ``widen_weights`` from the widening options (None: where it pays and fits)."""
    return True if a.widen_weights else False if a.no_widen_weights else None


def preview_path(a: argparse.Namespace, outputs: list[Path]) -> Path | None:
    """Where --preview-every writes its previews (None: no previews), after checking the options
    of previews and of the tiny VAE; ``outputs``: the images' paths, which a preview must not take."""
    if a.preview is not None and a.preview_every is None:
        raise InputError("--preview names the file that --preview-every writes; add --preview-every N.")
    if a.preview_every is not None and a.preview_every < 1:
        raise InputError(f"--preview-every must be a number of steps, at least 1, got {a.preview_every}.")
    if a.tiny_vae is not None and a.vae != "tiny" and a.preview_every is None:
        raise InputError("--tiny-vae names the tiny VAE of --vae tiny and --preview-every; add one of them.")
    if a.vae == "tiny" and a.tile_vae:
        raise InputError("--tile-vae tiles the full VAE's decode, and --vae tiny decodes with the tiny VAE, whole; "
                         "leave out one of them.")
    if a.preview_every is None:
        return None
    path = a.preview if a.preview is not None else a.output.with_name(f"{a.output.stem}.preview.png")
    if any(path.resolve() == output.resolve() for output in outputs):
        raise InputError(f"the preview {path} would replace an output image; give --preview another file.")
    return path
