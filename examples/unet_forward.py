"""Run one UNet forward pass and report its shape, time and memory.

    python examples/unet_forward.py                       # tiny SDXL-shaped UNet, random weights
    python examples/unet_forward.py --preset sdxl-base --latent 64 --dtype float16
    python examples/unet_forward.py --model path/to/mlx-unet-folder

Random weights need no download; --model takes a folder with config.json and MLX weights.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import mlx_unet  # noqa: E402,F401  (before mlx: picks the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_unet import PRESETS, UNet2DConditionModel, UNetConfig, cpu  # noqa: E402
from mlx_unet.configs.base import DTYPES  # noqa: E402



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny", choices=list(PRESETS), help="architecture with random weights (default: tiny)")
    source.add_argument("--model", type=Path, help="an MLX UNet folder (config.json + *.safetensors)")
    p.add_argument("--latent", type=int, nargs="+", default=[32], metavar="N",
                   help="latent height [width] (default: 32; 128 is a 1024x1024 SDXL image)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default: 2, as classifier-free guidance runs)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and activations (default: float32)")
    p.add_argument("--time-ids", type=int, default=6, help="SDXL micro-conditioning ids (default: 6; the refiner takes 5)")
    p.add_argument("--steps", type=int, default=3, help="forward passes to time (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    height, width = (args.latent * 2)[:2]
    dtype = DTYPES[args.dtype]
    try:
        if args.model:
            model = UNet2DConditionModel.from_pretrained(args.model, dtype=dtype)
        else:
            mx.random.seed(args.seed)
            model = UNet2DConditionModel(UNetConfig.from_preset(args.preset))
            model.set_dtype(dtype)
            model = cpu.prepare(model)  # the CPU kernels on the CPU, as from_pretrained does
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mx.eval(model.parameters())
    c = model.config
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))

    mx.random.seed(args.seed)
    sample = mx.random.normal((args.batch, height, width, c.in_channels))
    context = mx.random.normal((args.batch, 77, c.cross_attention_dim))
    added = {}
    if c.has_text_time_embedding:
        # original size, crop top-left, target size (the refiner's 5th id is an aesthetic score)
        ids = [height * 8, width * 8, 0, 0, height * 8, width * 8][: args.time_ids]
        pooled = c.projection_class_embeddings_input_dim - len(ids) * c.addition_time_embed_dim
        added = {"text_embeds": mx.random.normal((args.batch, pooled)),
                 "time_ids": mx.array([ids] * args.batch, mx.float32)}

    print(f"UNet: {n_params / 1e6:.1f} M parameters, {args.dtype}, input {tuple(sample.shape)} (NHWC)")
    for step in range(args.steps):
        start = time.perf_counter()
        out = model(sample, 999 - step * 100, context, **added)
        mx.eval(out)
        print(f"  forward {step + 1}/{args.steps}: {time.perf_counter() - start:.3f} s", flush=True)
    print(f"output {tuple(out.shape)}, mean {out.astype(mx.float32).mean().item():+.4f}, "
          f"std {out.astype(mx.float32).std().item():.4f}, peak memory {mx.get_peak_memory() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
