"""Denoise SDXL (or SD 1.x/2.x) latents from prompt embeddings with an MLX UNet: the sampler loop
alone. For the whole path, prompt to PNG, run ``mlx-unet generate --demo`` (nothing downloaded)
or ``mlx-unet generate PROMPT --model MODEL``.

    python examples/sample.py --demo                          # tiny random UNet, no files needed
    python examples/sample.py --model models/sdxl-base --embeddings prompt.safetensors -o latents.safetensors

--model is a folder written by convert.py. --embeddings is a safetensors file with
`prompt_embeds` (1, 77, 2048) and `pooled_prompt_embeds` (1, 1280) (SDXL), optionally
`negative_prompt_embeds` and `negative_pooled_prompt_embeds`; examples/make_embeddings.py makes
one with diffusers. The output holds `latents` (B, H/8, W/8, 4), NHWC, ready for the VAE decoder
(divide by its scaling factor first, 0.13025 for SDXL).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import mlx_unet  # noqa: E402,F401  (before mlx: picks the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402

from mlx_unet import UNet2DConditionModel, UNetConfig, cpu  # noqa: E402
from mlx_unet import Sampler  # noqa: E402
from mlx_unet.configs.base import DTYPES  # noqa: E402
from mlx_unet.schedulers import SAMPLERS, SDXL_SCHEDULER_CONFIG, make_scheduler  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="run the whole loop on a tiny random UNet, no files")
    p.add_argument("--model", type=Path, help="MLX UNet folder (convert.py's output)")
    p.add_argument("--embeddings", type=Path, help="safetensors file with prompt_embeds [, pooled_prompt_embeds, negatives]")
    p.add_argument("-o", "--output", type=Path, default=Path("latents.safetensors"), help="where to write the latents")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale; <= 1 disables it (default: 5)")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--scheduler", default="euler",
                   help=f"sampler: {', '.join(SAMPLERS)}, or a web UI name such as 'DPM++ 2M Karras' (default: euler)")
    p.add_argument("--scheduler-config", type=Path, help="a diffusers scheduler_config.json (default: SDXL base's)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override (SD 2.x 768 models: v_prediction)")
    p.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), help="image size in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="float16", help="UNet weights and activations (default: float16)")
    return p.parse_args(argv)


def demo_inputs(seed: int):
    """A tiny SDXL-shaped UNet with random weights and random 'prompt embeddings'."""
    mx.random.seed(seed)
    config = UNetConfig.from_preset("tiny")
    unet = cpu.prepare(UNet2DConditionModel(config))  # the CPU kernels on the CPU, as from_pretrained does
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    embeddings = {
        "prompt_embeds": mx.random.normal((1, 77, config.cross_attention_dim)),
        "pooled_prompt_embeds": mx.random.normal((1, pooled)),
    }
    return unet, embeddings


def load_embeddings(path: Path) -> dict[str, mx.array]:
    try:
        tensors = mx.load(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}).") from None
    if "prompt_embeds" not in tensors:
        raise ValueError(f"{path} has no 'prompt_embeds' tensor (it has: {', '.join(sorted(tensors)) or 'nothing'}).")
    known = {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    return {k: v for k, v in tensors.items() if k in known}


def save_atomically(path: Path, latents: mx.array, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, {"latents": latents}, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.demo:
            unet, embeddings = demo_inputs(args.seed)
            steps = min(args.steps, 8)
        else:
            if not args.model or not args.embeddings:
                raise ValueError("give --model and --embeddings, or --demo.")
            unet = UNet2DConditionModel.from_pretrained(args.model, dtype=DTYPES[args.dtype])
            embeddings = load_embeddings(args.embeddings)
            steps = args.steps
        overrides = {"prediction_type": args.prediction_type} if args.prediction_type else {}
        scheduler = make_scheduler(args.scheduler, args.scheduler_config or SDXL_SCHEDULER_CONFIG, **overrides)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    height, width = args.size if args.size else (None, None)
    sampler = Sampler(unet, scheduler)
    start = time.perf_counter()
    try:
        for step in sampler.steps(
            embeddings["prompt_embeds"], embeddings.get("pooled_prompt_embeds"),
            negative_prompt_embeds=embeddings.get("negative_prompt_embeds"),
            negative_pooled_prompt_embeds=embeddings.get("negative_pooled_prompt_embeds"),
            num_inference_steps=steps, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
            height=height, width=width, seed=args.seed,
        ):
            done = step.index + 1
            bar = "#" * (20 * done // step.total)
            print(f"\rstep {done:3d}/{step.total} [{bar:<20}] {step.seconds:.2f} s/step", end="", file=sys.stderr, flush=True)
    except ValueError as e:  # wrong embedding shapes and the like
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    latents = step.latents
    save_atomically(args.output, latents, {"scheduler": args.scheduler, "steps": str(steps), "seed": str(args.seed)})
    print(f"wrote {args.output}: latents {tuple(latents.shape)} in {time.perf_counter() - start:.1f} s, "
          f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
