"""The CPU Linear's weight layout: diffusers' row-major (out, in), as the kernels keep it, against
its (in, out) transpose, which an earlier version kept, in one UNet forward.

    python benchmarks/bench_linear_layout.py                      # SDXL base, 32 and 64 latents, batch 1
    python benchmarks/bench_linear_layout.py --latent 32 --batch 2
    python benchmarks/bench_linear_layout.py --quick              # tiny model: checks the benchmark runs

One model (random float32 weights drawn in MLX: the layout, not the values, is measured) with
the CPU kernels; every Linear's weight is copied into one layout, then the other, in turns, and
each turn times ``--repeats`` forwards after a warm-up one. Reported per latent: the median
seconds of each layout, their ratio, GFLOP/s over the forward's products, MLX's peak memory, and
the largest difference between the two layouts' outputs (the products sum in another order).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import mlx_unet  # noqa: E402,F401  (before mlx: the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

import torch_reference  # noqa: E402  (benchmarks/, on sys.path when run as a script)
from bench_unet import counting_flops  # noqa: E402
from in_turns import count, in_turns  # noqa: E402
from mlx_unet import PRESETS, UNet2DConditionModel, UNetConfig, cpu  # noqa: E402
from mlx_unet.cpu.linear import Linear  # noqa: E402

LAYOUTS = {
    "row-major (out, in)": lambda weight: mx.contiguous(weight),
    "transposed (in, out)": lambda weight: mx.contiguous(weight.T).T,
}


def random_unet(config: UNetConfig) -> UNet2DConditionModel:
    mx.random.seed(0)
    unet = UNet2DConditionModel(config)
    unet.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.02, unet.parameters()))
    mx.eval(unet.parameters())
    return unet


def inputs(config: UNetConfig, latent: int, batch: int) -> tuple[tuple, dict]:
    """(sample, timestep, context) and SDXL's added inputs: ``bench_unet.py``'s, as MLX arrays."""
    arrays = {name: mx.array(value) for name, value in
              torch_reference.make_unet_inputs(config.to_diffusers_dict(), batch, latent).items()}
    added = {name: arrays[name] for name in ("text_embeds", "time_ids") if name in arrays}
    return (arrays["sample"], arrays["timestep"], arrays["context"]), added


def step_gflop(unet: UNet2DConditionModel, config: UNetConfig, latent: int, batch: int) -> float:
    """The products of one sampling step (the text's keys and values made once per run), counted
    on the plain model: the CPU kernels compute the same ones."""
    (sample, timestep, context), added = inputs(config, latent, batch)
    with counting_flops() as flops:
        unet(sample, timestep, None, cross_attention_kv=unet.cross_attention_kv(context), **added)
    return flops[0] / 1e9


def bench_latent(accelerated: UNet2DConditionModel, config: UNetConfig, latent: int, batch: int, gflop: float,
                 rounds: int, repeats: int) -> dict:
    (sample, timestep, context), added = inputs(config, latent, batch)
    text_kv = accelerated.cross_attention_kv(context)
    mx.eval(text_kv)
    linears = [module for _, module in accelerated.named_modules() if isinstance(module, Linear)]

    def forward() -> mx.array:
        return accelerated(sample, timestep, None, cross_attention_kv=text_kv, **added)

    def lay_out(name: str) -> Callable[[], None]:
        def set_up() -> None:
            for layer in linears:
                layer.weight = LAYOUTS[name](layer.weight)
            mx.eval([layer.weight for layer in linears])
        return set_up

    r = in_turns({name: lay_out(name) for name in LAYOUTS}, forward, rounds, repeats)
    medians, outputs, peaks = r["medians"], r["outputs"], r["peaks"]
    first, second = LAYOUTS
    return {"latent": latent, "medians": medians, "ratio": medians[first] / medians[second],
            "gflops": {name: gflop / median for name, median in medians.items()}, "peaks": peaks,
            "diff": mx.abs(outputs[first] - outputs[second]).max().item(),
            "scale": mx.abs(outputs[second]).max().item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sdxl-base", choices=list(PRESETS), help="architecture (default: sdxl-base)")
    p.add_argument("--latent", type=int, nargs="+", default=[32, 64], help="latent sizes (default: 32 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=count, default=3, help="turns of each layout (default: 3)")
    p.add_argument("--repeats", type=count, default=2, help="timed forwards per turn (default: 2)")
    p.add_argument("--quick", action="store_true", help="tiny model, one small case: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        config = UNetConfig.from_preset("tiny")
        args.latent, args.rounds, args.repeats = [8], 1, 1
    else:
        config = UNetConfig.from_preset(args.family)
    unet = random_unet(config)
    gflop = {latent: step_gflop(unet, config, latent, args.batch) for latent in args.latent}
    unet = cpu.accelerate(unet)
    first, second = LAYOUTS
    print(f"{'tiny' if args.quick else args.family}, batch {args.batch}, float32")
    print(f"{'latent':>6} {'row-major s':>12} {'transposed s':>13} {'ratio':>6} {'row-major GFLOP/s':>18} "
          f"{'transposed GFLOP/s':>19} {'peak GiB':>9} {'max diff':>9} {'of max':>8}")
    for latent in args.latent:
        r = bench_latent(unet, config, latent, args.batch, gflop[latent], args.rounds, args.repeats)
        print(f"{latent:>6} {r['medians'][first]:>12.3f} {r['medians'][second]:>13.3f} {r['ratio']:>6.3f} "
              f"{r['gflops'][first]:>18.1f} {r['gflops'][second]:>19.1f} {max(r['peaks'].values()):>9.2f} "
              f"{r['diff']:>9.1e} {r['scale']:>8.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
