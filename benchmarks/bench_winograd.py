"""The CPU convolution's Winograd F(4x4, 3x3) products against its per-tap products, on
SDXL's convolution shapes alone, in the VAE and in the UNet.

    python benchmarks/bench_winograd.py                           # layers, VAE at 512 px, UNet at 64x64 batch 2
    python benchmarks/bench_winograd.py --what vae --size 512 1024
    python benchmarks/bench_winograd.py --what unet --latent 32 64 --batch 2
    python benchmarks/bench_winograd.py --quick                   # small shapes, tiny models: checks the benchmark runs

One process, one model (random float32 weights drawn in MLX: the arithmetic, not the values, is
measured), the CPU kernels on; Winograd's products are switched off by raising
``winograd.MIN_TILES`` out of reach and back, in turns (``--rounds``), each turn timing
``--repeats`` calls after a warm-up one. Reported per case: the median seconds of each way, their
ratio, GFLOP/s counted as the direct convolution's multiply-adds (so that the two ways compare;
for a model, all its products), MLX's peak memory of a call with Winograd above what the process
held before it (the weights), and the largest difference between the two ways' outputs relative
to the output's largest magnitude.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import mlx_unet  # noqa: E402,F401  (before mlx: the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from bench_linear_layout import inputs, random_unet  # noqa: E402  (benchmarks/, on sys.path as a script)
from bench_unet import counting_flops  # noqa: E402
from in_turns import count, in_turns  # noqa: E402
from mlx_unet import UNetConfig, cpu  # noqa: E402
from mlx_unet.configs.vae import VAEConfig  # noqa: E402
from mlx_unet.cpu import winograd  # noqa: E402
from mlx_unet.cpu.conv import Conv2d  # noqa: E402
from mlx_unet.models.vae import AutoencoderKL  # noqa: E402

# SDXL's 3x3 convolutions: (batch, size, in, out). UNet levels at a 64x64 latent in a guided
# batch of two; the VAE decoder's levels at 512 px (its largest, 512x512x128, runs at 1024 px).
LAYERS = [(2, 64, 320, 320), (2, 64, 640, 320), (2, 32, 640, 640), (2, 32, 1280, 640),
          (1, 64, 512, 512), (1, 128, 512, 512), (1, 256, 512, 256), (1, 256, 256, 256), (1, 512, 256, 128),
          (1, 512, 128, 128)]
QUICK_LAYERS = [(2, 32, 128, 128)]


def a_b(call, rounds: int, repeats: int) -> dict:
    """``call`` each way in turns (Winograd's products held off by ``MIN_TILES`` out of reach):
    medians, the peak memory of a call with Winograd above what was held before it (the models'
    weights), and the output difference relative to the output's largest magnitude."""
    winograd_from = winograd.MIN_TILES
    ways = {"per-tap": lambda: setattr(winograd, "MIN_TILES", sys.maxsize),
            "Winograd": lambda: setattr(winograd, "MIN_TILES", winograd_from)}
    try:
        r = in_turns(ways, call, rounds, repeats)
    finally:
        winograd.MIN_TILES = winograd_from
    taps, fast = r["outputs"]["per-tap"], r["outputs"]["Winograd"]
    diff = mx.abs(fast - taps).max().item() / mx.abs(taps).max().item()
    return {"medians": r["medians"], "peak": r["added"]["Winograd"], "diff": diff}


def layer_case(batch: int, size: int, in_channels: int, out_channels: int):
    conv = Conv2d.from_module(nn.Conv2d(in_channels, out_channels, 3, padding=1))
    x = mx.random.normal((batch, size, size, in_channels))
    mx.eval(x, conv.parameters())
    gflop = 2 * batch * size * size * 9 * in_channels * out_channels / 1e9
    return f"conv {batch}x{size}x{size} {in_channels}->{out_channels}", lambda: conv(x), gflop


def vae_cases(preset: str, sizes: list[int]):
    """(the plain VAE, its cases): each size's decode and encode, GFLOP counted on its layers."""
    mx.random.seed(0)
    vae = AutoencoderKL(VAEConfig.from_preset(preset))
    vae.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.02, vae.parameters()))
    cases = []
    for size in sizes:
        latents = mx.random.normal((1, size // 8, size // 8, 4))
        images = mx.random.uniform(-1, 1, (1, size, size, 3))
        with counting_flops() as decode_flops:
            vae.decode(latents)
        with counting_flops() as encode_flops:
            vae.encode(images)
        cases += [(f"VAE decode {size} px", lambda z=latents: vae.decode(z), decode_flops[0] / 1e9),
                  (f"VAE encode {size} px", lambda x=images: vae.encode(x).mean, encode_flops[0] / 1e9)]
    return vae, cases


def unet_cases(preset: str, latents: list[int], batch: int):
    """(the plain UNet, its cases): a forward per latent size, GFLOP counted on its layers."""
    config = UNetConfig.from_preset(preset)
    unet = random_unet(config)
    cases = []
    for latent in latents:
        (sample, timestep, context), added = inputs(config, latent, batch)
        text_kv = unet.cross_attention_kv(context)
        with counting_flops() as flops:
            unet(sample, timestep, None, cross_attention_kv=text_kv, **added)
        cases.append((f"UNet {latent}x{latent} batch {batch}",
                      lambda s=sample, t=timestep, kv=text_kv, a=added: unet(s, t, None, cross_attention_kv=kv, **a),
                      flops[0] / 1e9))
    return unet, cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", nargs="+", choices=["layers", "vae", "unet"], default=["layers", "vae", "unet"])
    p.add_argument("--size", type=int, nargs="+", default=[512], help="VAE image sizes in pixels (default: 512)")
    p.add_argument("--latent", type=int, nargs="+", default=[64], help="UNet latent sizes (default: 64)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (default: 2, a guided step)")
    p.add_argument("--rounds", type=count, default=2, help="turns of each way (default: 2)")
    p.add_argument("--repeats", type=count, default=2, help="timed calls per turn (default: 2)")
    p.add_argument("--quick", action="store_true", help="small shapes and tiny models: a smoke run")
    args = p.parse_args(argv)
    layers, vae_preset, unet_preset = LAYERS, "sdxl", "sdxl-base"
    if args.quick:
        layers, vae_preset, unet_preset = QUICK_LAYERS, "tiny", "tiny"
        args.size, args.latent, args.rounds, args.repeats = [64], [8], 1, 1
    mx.random.seed(0)
    print("float32, CPU kernels; GFLOP/s as direct convolutions")
    print(f"{'case':<32} {'per-tap s':>10} {'Winograd s':>11} {'ratio':>6} {'per-tap GFLOP/s':>16} "
          f"{'Winograd GFLOP/s':>17} {'peak GiB':>9} {'rel diff':>9}")
    cases = []
    if "layers" in args.what:
        cases += [layer_case(*shape) for shape in layers]
    for what, make in (("vae", lambda: vae_cases(vae_preset, args.size)),
                       ("unet", lambda: unet_cases(unet_preset, args.latent, args.batch))):
        if what in args.what:
            model, made = make()
            cpu.accelerate(model)  # after counting: the counts read the plain model's layers
            cases += made
    for name, call, gflop in cases:
        r = a_b(call, args.rounds, args.repeats)
        taps, fast = r["medians"]["per-tap"], r["medians"]["Winograd"]
        print(f"{name:<32} {taps:>10.3f} {fast:>11.3f} {fast / taps:>6.3f} {gflop / taps:>16.1f} "
              f"{gflop / fast:>17.1f} {r['peak']:>9.2f} {r['diff']:>9.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
