"""Our VAE decode and encode against diffusers' AutoencoderKL (or AutoencoderTiny), in one process, float32.

    python benchmarks/bench_vae.py                                   # SDXL's VAE, decode and encode, 512 and 1024 px
    python benchmarks/bench_vae.py --size 512 --what decode --repeats 5
    python benchmarks/bench_vae.py --vae tiny                        # the tiny VAE (TAESD, TAESDXL), 512 and 1024 px
    python benchmarks/bench_vae.py --quick                           # a small VAE, 64 px: checks the benchmark runs

Both sides get the same seeded random weights (every parameter drawn, so that each one matters;
built in diffusers, handed to ours tensor by tensor), the same inputs (latents from a normal
draw, images uniform in [-1, 1]) and the same thread count (torch's threads and OpenBLAS's).

diffusers is timed first, before this process imports mlx_unet: that import loads OpenBLAS
globally (cpu/blas.py), and torch timed after it can run slower than a torch user sees it
(benchmarks/torch_reference.py says why). Each case is run once as a warm-up, then --repeats
times; the median is reported. Per case: seconds (ours, diffusers, ours / diffusers), the FLOPs
of the reference computation (every convolution, Linear and attention product, counted from
our plain model's layers and shapes), the GFLOP/s ours reaches on that count, peak memory (MLX's
for ours, and each side's resident-set growth over the call), and the largest difference between
the outputs (images for decode, the latent mean for encode), absolute and relative to the
largest value. Both sides decode whole (ours with tiling disabled). Other processes on the machine
show in the times (each side's lines give the 1-minute load average after it): run it on a quiet
one.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import torch_reference  # benchmarks/: numpy and torch only, so diffusers is still timed before mlx_unet loads

ROOT = Path(__file__).resolve().parent.parent

# The architecture fields of diffusers' config for each VAE benchmarked, by --vae and then by
# preset: SDXL's published vae/config.json, TAESD's (AutoencoderTiny's defaults), and a small
# variant of each for --quick (mlx_unet's presets of the same names, checked equal once mlx_unet is
# imported: it cannot be before diffusers is timed).
_SDXL = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
         "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 4,
         "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
ARCHITECTURES = {
    "kl": {"sdxl": _SDXL, "tiny": {**_SDXL, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8,
                                   "sample_size": 128, "force_upcast": False}},
    "tiny": {"taesd": {}, "tiny": {"encoder_block_out_channels": [8] * 4, "decoder_block_out_channels": [8] * 4,
                                   "num_encoder_blocks": [1, 2, 1, 1], "num_decoder_blocks": [1, 2, 1, 1]}},
}
# Per --vae: diffusers' class and ours (the model, then its config), by name.
CLASSES = {"kl": ("AutoencoderKL", "AutoencoderKL", "VAEConfig"),
           "tiny": ("AutoencoderTiny", "AutoencoderTiny", "TinyVAEConfig")}


# ---------------------------------------------------------------------- diffusers' side


def random_vae(vae: str, architecture: dict, seed: int) -> torch.nn.Module:
    """diffusers' AutoencoderKL (``vae`` "kl") or AutoencoderTiny ("tiny") with every parameter
    drawn from ``seed`` (``torch_reference.random_module``)."""
    import diffusers

    return torch_reference.random_module(getattr(diffusers, CLASSES[vae][0]), **architecture, seed=seed)


def latent_mean(encoded) -> object:
    """The latents an encode gives: AutoencoderKL's distribution's mean, AutoencoderTiny's latents."""
    return encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents


def make_input(what: str, size: int, latent_channels: int, seed: int = 0) -> np.ndarray:
    """NHWC: latents for decode, images in [-1, 1] for encode."""
    rng = np.random.default_rng(seed)
    if what == "decode":
        return rng.standard_normal((1, size // 8, size // 8, latent_channels), dtype=np.float32)
    return rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(call, warmup: int, repeats: int) -> tuple[float, int, object]:
    """(median seconds, peak resident-set growth over a call in bytes, the last result)."""
    for _ in range(warmup):
        result = call()
    times, growth = [], 0
    for _ in range(repeats):
        gc.collect()
        before = resident_bytes()
        Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark below
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
        growth = max(growth, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    return statistics.median(times), growth, result


def time_diffusers(reference, cases, warmup: int, repeats: int) -> dict:
    latent_channels = reference.config.latent_channels
    results = {}
    for what, size in cases:
        x = torch.from_numpy(make_input(what, size, latent_channels)).permute(0, 3, 1, 2).contiguous()

        @torch.no_grad()
        def call():
            if what == "decode":
                return reference.decode(x).sample.permute(0, 2, 3, 1).numpy()
            return latent_mean(reference.encode(x)).permute(0, 2, 3, 1).numpy()

        seconds, growth, output = measured(call, warmup, repeats)
        results[what, size] = {"seconds": seconds, "rss": growth, "output": output}
        print(f"  diffusers {what} {size} px: {seconds:.2f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    return results


# ---------------------------------------------------------------------- ours


def count_gflop(ours, what: str, x) -> float:
    """FLOPs of one call, counted while the plain model (before the CPU kernels: the reference's
    products) is traced; MLX is lazy, so tracing reads shapes only."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_unet import counting_flops

    with counting_flops() as flops:
        ours.decode(x) if what == "decode" else ours.encode(x)
    return flops[0] / 1e9


def time_ours(reference, vae: str, preset: str, cases, warmup: int, repeats: int, theirs: dict) -> list[dict]:
    import mlx.core as mx

    import mlx_unet
    from mlx_unet import cpu
    from mlx_unet.weights import load_weights, torch_to_mlx_layout

    model_class, config_class = (getattr(mlx_unet, name) for name in CLASSES[vae][1:])
    config = config_class.from_dict(dict(reference.config))
    if config != config_class.from_preset(preset):
        raise SystemExit(f"ARCHITECTURES[{vae!r}][{preset!r}] no longer matches mlx_unet's preset: update it")
    weights = {name: mx.array(torch_to_mlx_layout(t.numpy())) for name, t in reference.state_dict().items()}
    ours = model_class(config)
    load_weights(ours, weights)
    if vae == "kl":
        ours.disable_tiling()  # whole, as diffusers decodes by default, whatever the machine's memory
    inputs = {case: mx.array(make_input(*case, config.latent_channels)) for case in cases}
    gflop = {(what, size): count_gflop(ours, what, inputs[what, size]) for what, size in cases}
    ours = cpu.prepare(ours)  # the CPU kernels unless MLX_UNET_CPU_KERNELS=0
    rows = []
    for what, size in cases:
        x = inputs[what, size]

        def call():
            if what == "decode":
                out = ours.decode(x)
            else:
                out = ours.encode(x)
                out = out.mean if vae == "kl" else out
            mx.eval(out)
            return out

        mx.clear_cache()
        mx.reset_peak_memory()
        seconds, growth, output = measured(call, warmup, repeats)
        print(f"  ours {what} {size} px: {seconds:.2f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
        reference_output = theirs[what, size]["output"]
        difference = np.abs(np.array(output) - reference_output).max()
        rows.append({"what": what, "size": size, "ours": seconds, "diffusers": theirs[what, size]["seconds"],
                     "gflop": gflop[what, size], "mlx_peak": mx.get_peak_memory(), "ours_rss": growth,
                     "diffusers_rss": theirs[what, size]["rss"], "max_diff": float(difference),
                     "relative_diff": float(difference / np.abs(reference_output).max())})
    return rows


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", default=[512, 1024], help="image sizes in pixels (default: 512 1024)")
    p.add_argument("--what", nargs="+", choices=["decode", "encode"], default=["decode", "encode"])
    p.add_argument("--vae", choices=list(ARCHITECTURES), default="kl",
                   help="kl: AutoencoderKL at SDXL's size (default); tiny: AutoencoderTiny at TAESD's")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and OpenBLAS threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="a small VAE of its kind at 64 px, one run each: a smoke run")
    args = p.parse_args(argv)
    preset = "sdxl" if args.vae == "kl" else "taesd"
    if args.quick:
        preset, args.size, args.warmup, args.repeats = "tiny", [64], 0, 1
    for size in args.size:
        if size <= 0 or size % 8:
            p.error(f"--size takes positive multiples of 8 pixels, got {size}")
    if "mlx" in sys.modules or "mlx_unet" in sys.modules:
        raise RuntimeError("diffusers must be timed before MLX is imported")
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)  # read as OpenBLAS loads (import mlx_unet)
    os.environ.setdefault("MLX_ENABLE_TF32", "0")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    cases = [(what, size) for what in args.what for size in args.size]
    print(f"{CLASSES[args.vae][0]} ({preset}), float32, batch 1; torch {torch.__version__} and OpenBLAS on "
          f"{args.threads} threads")
    reference = random_vae(args.vae, ARCHITECTURES[args.vae][preset], seed=0)
    theirs = time_diffusers(reference, cases, args.warmup, args.repeats)

    sys.path.insert(0, str(ROOT))  # run from a source checkout
    import mlx_unet  # (after diffusers is timed: see the module docstring)
    import mlx.core as mx

    path = "CPU kernels" if mlx_unet.cpu.kernels_enabled() else "plain MLX"
    print(f"ours: MLX {mx.__version__} ({mx.default_device()}, {path}, {mlx_unet.cpu.blas.loaded or 'bundled BLAS'})")
    rows = time_ours(reference, args.vae, preset, cases, args.warmup, args.repeats, theirs)
    print(f"{'what':>6} {'px':>5} {'ours s':>8} {'diffusers s':>11} {'ratio':>6} {'GFLOP':>7} {'GFLOP/s':>7} "
          f"{'MLX peak MiB':>12} {'ours RSS MiB':>12} {'diffusers RSS MiB':>17} {'max |diff|':>10} {'relative':>8}")
    for r in rows:
        print(f"{r['what']:>6} {r['size']:>5} {r['ours']:8.3g} {r['diffusers']:11.3g} {r['ours'] / r['diffusers']:6.2f} "
              f"{r['gflop']:7.3f} {r['gflop'] / r['ours']:7.1f} {r['mlx_peak'] / 2**20:12.0f} "
              f"{r['ours_rss'] / 2**20:12.0f} {r['diffusers_rss'] / 2**20:17.0f} {r['max_diff']:10.2e} "
              f"{r['relative_diff']:8.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
