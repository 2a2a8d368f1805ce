"""The CPU attention's chunks in one pipeline against two (``cpu/attention.py``), on SD's
attention shapes alone (beside torch's ``scaled_dot_product_attention``) and in SDXL's UNet.

    python benchmarks/bench_attention.py                            # the shapes
    python benchmarks/bench_attention.py --what unet --latent 128   # a guided 1024 px forward (minutes)
    python benchmarks/bench_attention.py --quick --what shapes unet # a small shape, a tiny UNet: checks it runs

One process, float32, random values drawn in MLX; the two pipelines are held off by raising
``attention.PIPELINES_FROM_SCORES`` out of reach and forced by lowering it to 0, in turns
(``--rounds``), each turn timing ``--repeats`` calls after a warm-up one (``in_turns.py``); a
model case switches between out of reach and the shipped threshold instead. Reported per case:
the median seconds of each way, their ratio, GFLOP/s of the two products (a model case: all its
products), and the largest difference between the two ways' outputs (none expected: the same
products and passes, in another order of chunks). For the shapes, torch's attention (what
diffusers calls) is timed in a process of its own with the same threads (``torch_reference.py``),
the median of ``--repeats`` calls after a warm-up; "ours / torch" takes the shipped way: two
pipelines where the shape reaches ``PIPELINES_FROM_SCORES``, else one. ``--no-torch`` skips it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import mlx_unet  # noqa: E402,F401  (before mlx: the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402

import torch_reference  # noqa: E402  (benchmarks/, on sys.path as a script)
from bench_winograd import unet_cases  # noqa: E402  (benchmarks/, on sys.path as a script)
from in_turns import count, in_turns  # noqa: E402
from mlx_unet import cpu  # noqa: E402
from mlx_unet.cpu import attention  # noqa: E402

# (batch, heads, query tokens, key tokens, head width, what it is).
SHAPES = [(2, 10, 4096, 4096, 64, "SDXL 64x64 level, guided 1024 px"),
          (2, 20, 1024, 1024, 64, "SDXL 32x32 level, guided 1024 px"),
          (2, 10, 1024, 1024, 64, "SDXL 32x32 level, guided 512 px"),
          (2, 20, 256, 256, 64, "SDXL 16x16 level, guided 512 px"),
          (2, 20, 1024, 77, 64, "SDXL cross-attention, 32x32 level"),
          (2, 8, 4096, 4096, 40, "SD 1.x 64x64 level, guided 512 px"),
          (1, 1, 4096, 4096, 512, "VAE mid-block, 512 px"),
          (1, 1, 16384, 16384, 512, "VAE mid-block, 1024 px")]
QUICK_SHAPES = [(2, 2, 300, 320, 32, "small")]


def a_b(call, rounds: int, repeats: int, threshold: int) -> dict:
    """``call`` with one pipeline and with two (``threshold``: PIPELINES_FROM_SCORES then), in turns."""
    shipped = attention.PIPELINES_FROM_SCORES
    ways = {"one": lambda: setattr(attention, "PIPELINES_FROM_SCORES", sys.maxsize),
            "two": lambda: setattr(attention, "PIPELINES_FROM_SCORES", threshold)}
    try:
        r = in_turns(ways, call, rounds, repeats)
    finally:
        attention.PIPELINES_FROM_SCORES = shipped
    diff = mx.abs(r["outputs"]["two"] - r["outputs"]["one"]).max().item()
    return {"medians": r["medians"], "diff": diff}


def shape_case(batch: int, heads: int, tokens: int, keys: int, width: int, what: str):
    q, k, v = (mx.random.normal((batch, heads, n, width)) for n in (tokens, keys, keys))
    mx.eval(q, k, v)
    gflop = 4 * batch * heads * tokens * keys * width / 1e9
    name = f"{what} ({batch}x{heads}x{tokens}x{keys}, {width})"
    shipped = "two" if attention.in_two_pipelines(batch * heads, tokens, keys) else "one"
    return name, lambda: attention.chunked_attention(q, k, v, width**-0.5), gflop, shipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", nargs="+", choices=["shapes", "unet"], default=["shapes"])
    p.add_argument("--latent", type=int, nargs="+", default=[128], help="UNet latent sizes (default: 128)")
    p.add_argument("--rounds", type=count, default=2, help="turns of each way (default: 2)")
    p.add_argument("--repeats", type=count, default=2, help="timed calls per turn (default: 2)")
    p.add_argument("--no-torch", action="store_true", help="skip torch's attention")
    p.add_argument("--quick", action="store_true", help="small shapes and a tiny UNet: a smoke run")
    args = p.parse_args(argv)
    shapes, unet_preset = SHAPES, "sdxl-base"
    if args.quick:
        shapes, unet_preset, args.latent, args.rounds, args.repeats = QUICK_SHAPES, "tiny", [8], 1, 1
    mx.random.seed(0)
    threads = cpu.blas.threads() or 1
    print(f"float32, CPU kernels, {threads} BLAS threads; GFLOP/s of the products")
    cases = [(*shape_case(*shape), 0) for shape in shapes] if "shapes" in args.what else []
    torch_seconds = [None] * len(cases)
    if cases and not args.no_torch:
        theirs = torch_reference.run("attention", threads, shapes=[shape[:5] for shape in shapes], warmup=1,
                                     repeats=args.repeats, seed=0, sgemm_n=512 if args.quick else 4096)
        torch_seconds = theirs["seconds"]
        print(f"torch in its own process, {threads} threads: sgemm {theirs['sgemm']:.0f} GFLOP/s")
    print(f"{'case':<56} {'one s':>8} {'two s':>8} {'ratio':>6} {'one GFLOP/s':>12} {'two GFLOP/s':>12} "
          f"{'max diff':>9} {'torch s':>8} {'ours / torch':>12}")
    if "unet" in args.what:
        unet, made = unet_cases(unet_preset, args.latent, 2)
        cpu.accelerate(unet)
        # The tiny UNet's attention is far below the shipped threshold: forced there.
        cases += [(*case, None, 0 if args.quick else attention.PIPELINES_FROM_SCORES) for case in made]
        torch_seconds += [None] * len(made)
    for (name, call, gflop, shipped, threshold), theirs in zip(cases, torch_seconds):
        r = a_b(call, args.rounds, args.repeats, threshold)
        one, two = r["medians"]["one"], r["medians"]["two"]
        versus = f"{theirs:>8.3g} {r['medians'][shipped] / theirs:>12.2f}" if theirs else f"{'':>8} {'':>12}"
        print(f"{name:<56} {one:>8.3f} {two:>8.3f} {two / one:>6.3f} {gflop / one:>12.1f} {gflop / two:>12.1f} "
              f"{r['diff']:>9.1e} {versus}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
