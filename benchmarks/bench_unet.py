"""Our UNet forward against diffusers' (torch), both timed as their users run them.

    python benchmarks/bench_unet.py                                  # SDXL base, 32 and 64 latents, fp32, batch 1
    python benchmarks/bench_unet.py --latent 128 --batch 2 --dtype float16
    python benchmarks/bench_unet.py --latent 64 128 --batch 2 --dtype float16 --no-torch --low-memory
    python benchmarks/bench_unet.py --quick                          # tiny model: checks the benchmark runs

Both sides get the same weights (diffusers' model built from one seed, handed to MLX tensor by
tensor), the same inputs and the same thread count. diffusers is timed in a process of its own
that never loads MLX or mlx_unet (``torch_reference.py`` says why), and torch's sgemm rate in that
process is reported beside it. Ours is timed as a sampling step runs it: the prompt's
cross-attention keys and values made once (a run makes them once, before its first step).
Reported per case: median seconds per forward after warm-up (ours, diffusers, ratio), the FLOPs
of our forward counted from the model's own layers and the input shapes, the GFLOP/s that gives,
that as a share of MLX's sgemm GFLOP/s (measured between our timed forwards, median against
median), diffusers' GFLOP/s over its whole forward's FLOPs, torch's sgemm, and MLX's peak memory.
``--compile`` runs our forward through mx.compile and reports the first call (trace and kernel
build) apart; ``--low-memory`` measures the low-memory mode of a run (pipelines/run.py);
``--widen`` holds a half-precision UNet in float32 for the run instead of widening each weight as
it is used (``cpu.widen``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import torch_reference  # noqa: E402  (benchmarks/, on sys.path when run as a script)
import mlx_unet  # noqa: E402  (before mlx: the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import mlx.nn as nn  # noqa: E402
from mlx_unet import PRESETS, UNet2DConditionModel, UNetConfig, cpu  # noqa: E402
from mlx_unet.configs.base import DTYPES  # noqa: E402
from mlx_unet.models.attention import ScaledDotProductAttention  # noqa: E402
from mlx_unet.pipelines.run import RunSettings  # noqa: E402
from mlx_unet.weights import load_weights, torch_to_mlx_layout  # noqa: E402

SEED = 0  # of the diffusers UNet whose weights both sides run



# ---------------------------------------------------------------------- FLOP count


@contextmanager
def counting_flops():
    """Count multiply-adds (x2) of every Linear, Conv2d and attention call while a forward of
    the plain model (before ``cpu.prepare``: the same products) is traced. MLX is lazy, so
    tracing costs nothing: only shapes are read."""
    total = [0]
    linear_call, conv_call = nn.Linear.__call__, nn.Conv2d.__call__
    sdpa = ScaledDotProductAttention.__call__

    def linear(self, x):
        y = linear_call(self, x)
        total[0] += 2 * (x.size // x.shape[-1]) * self.weight.shape[0] * self.weight.shape[1]
        return y

    def conv(self, x):
        y = conv_call(self, x)
        out_ch, kh, kw, in_ch = self.weight.shape
        total[0] += 2 * (y.size // out_ch) * out_ch * kh * kw * in_ch
        return y

    def counted_attention(self, q, k, v, scale):
        b, h, nq, d = q.shape
        total[0] += 2 * 2 * b * h * nq * k.shape[2] * d  # Q K^T and P V
        return sdpa(self, q, k, v, scale)

    nn.Linear.__call__, nn.Conv2d.__call__ = linear, conv
    ScaledDotProductAttention.__call__ = counted_attention
    try:
        yield total
    finally:
        nn.Linear.__call__, nn.Conv2d.__call__ = linear_call, conv_call
        ScaledDotProductAttention.__call__ = sdpa


# ---------------------------------------------------------------------- measurements


def sgemm_gflops(n: int) -> float:
    """MLX's float32 n x n matmul rate in this process (best of two after a warm-up)."""
    a = mx.random.normal((n, n))
    mx.eval(a @ a)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        mx.eval(a @ a)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def median_seconds(run, warmup: int, repeats: int, between=None) -> tuple[float, list]:
    """Median seconds of ``run`` after ``warmup`` calls; ``between()`` is called (untimed) before
    each timed run and its results are returned too."""
    for _ in range(warmup):
        run()
    times, samples = [], []
    for _ in range(repeats):
        if between is not None:
            samples.append(between())
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), samples


def bench_case(config: UNetConfig, size: int, batch: int, dtype: str, warmup: int, repeats: int,
               threads: int | None, compile: bool = False, low_memory: bool = False, widen: bool = False,
               sgemm_n: int = 4096) -> dict:
    """``threads``: diffusers' thread count (in its own process), or None not to time it."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    diffusers_config = config.to_diffusers_dict()
    result = {"latent": size, "batch": batch, "dtype": dtype}
    if threads is not None:
        theirs = torch_reference.run("unet", threads, config=diffusers_config, batch=batch, size=size, dtype=dtype,
                                     warmup=warmup, repeats=repeats, seed=SEED, sgemm_n=sgemm_n)
        result["torch_s"], result["torch_sgemm"] = theirs["seconds"], theirs["sgemm"]
    torch.manual_seed(SEED)  # the reference process's weights
    reference = TorchUNet(**diffusers_config)
    inputs = torch_reference.make_unet_inputs(diffusers_config, batch, size)

    # Hand the weights over tensor by tensor, freeing torch's copy as we go.
    state = reference.state_dict()
    del reference
    gc.collect()
    weights = {}
    for name in list(state):
        tensor = state.pop(name)
        weights[name] = mx.array(torch_to_mlx_layout(tensor.numpy())).astype(DTYPES[dtype])
        mx.eval(weights[name])
    ours = UNet2DConditionModel(config)
    load_weights(ours, weights)
    del weights, state
    gc.collect()

    sample, timestep = mx.array(inputs["sample"]), mx.array(inputs["timestep"])
    context = mx.array(inputs["context"])
    added = {}
    if "time_ids" in inputs:
        added = {"text_embeds": mx.array(inputs["text_embeds"]), "time_ids": mx.array(inputs["time_ids"])}
    # Counted on the plain model: the CPU kernels compute the same products in their own code.
    with counting_flops() as flops:
        ours(sample, timestep, context, **added)
    result["reference_gflop"] = flops[0] / 1e9
    text_kv = ours.cross_attention_kv(context)  # made once per run: not a step's work
    with counting_flops() as flops:
        ours(sample, timestep, None, cross_attention_kv=text_kv, **added)
    result["gflop"] = flops[0] / 1e9
    ours = cpu.prepare(ours)  # the CPU kernels unless MLX_UNET_CPU_KERNELS=0
    text_kv = ours.cross_attention_kv(context)
    mx.eval(text_kv)
    step_inputs = dict(cross_attention_kv=text_kv, **added)

    settings = RunSettings(compile=compile, low_memory=low_memory, widen_weights=widen)
    forward = settings.forward(ours)
    with settings.applied(ours):
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        mx.eval(forward(sample, timestep, None, **step_inputs))
        result["first_s"] = time.perf_counter() - start
        # This host's speed drifts by 10-20% within minutes, so the machine's sgemm is measured
        # between our timed forwards (same state of the host) and its median is the reference.
        # Peak memory is read around each forward, so the sgemm's operands don't count.
        peaks = []

        def sample_sgemm() -> float:
            peaks.append(mx.get_peak_memory())
            gflops = sgemm_gflops(sgemm_n)
            mx.reset_peak_memory()
            return gflops

        result["ours_s"], sgemm = median_seconds(lambda: mx.eval(forward(sample, timestep, None, **step_inputs)),
                                                 max(warmup - 1, 0), repeats, sample_sgemm)
        result["sgemm"] = statistics.median(sgemm)
        result["peak_gib"] = max(peaks + [mx.get_peak_memory()]) / 2**30
    result["weights_gib"] = sum(v.nbytes for _, v in tree_flatten(ours.parameters())) / 2**30
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sdxl-base", choices=list(PRESETS), help="architecture (default: sdxl-base)")
    p.add_argument("--latent", type=int, nargs="+", default=[32, 64], help="latent sizes (default: 32 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both sides (default: all cores)")
    p.add_argument("--no-torch", action="store_true", help="time only our forward")
    p.add_argument("--compile", action="store_true", help="our forward through mx.compile; the first call is reported apart")
    p.add_argument("--low-memory", action="store_true", help="our forward in a run's low-memory mode")
    p.add_argument("--widen", action="store_true",
                   help="a half-precision UNet held in float32 for the run (RunSettings.widen_weights), not "
                        "widened layer by layer as it runs")
    p.add_argument("--quick", action="store_true", help="tiny model, one small case: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.family, args.latent, args.warmup, args.repeats = "tiny", [16], 1, 1

    os.environ.setdefault("MLX_ENABLE_TF32", "0")
    mlx_unet.cpu.blas.set_threads(args.threads)  # MLX's matmuls run in OpenBLAS's threads: as many as torch's
    config = UNetConfig.from_preset(args.family)
    blas = mlx_unet.cpu.blas.loaded or "MLX's bundled BLAS"
    mode = ", ".join(m for m, on in (("compiled", args.compile), ("low-memory", args.low_memory),
                                     ("half precision widened for the run", args.widen)) if on)
    print(f"{args.family}, batch {args.batch}{'; ' + mode if mode else ''}; {args.threads} threads; MLX {mx.__version__} "
          f"({mx.default_device()}, {blas}); diffusers in its own process")
    sgemm_n = 512 if args.quick else 4096
    print(f"sgemm: {sgemm_n}x{sgemm_n} float32 matmul, MLX's (median of one before each of our timed forwards) "
          "and torch's (in diffusers' process)")
    header = (f"{'latent':>6} {'dtype':>8} {'ours s':>8} {'diffusers s':>11} {'ratio':>6} {'GFLOP':>8} "
              f"{'GFLOP/s':>8} {'sgemm':>6} {'of sgemm':>8} {'diffusers GFLOP/s':>17} {'torch sgemm':>11} "
              f"{'peak GiB':>8} {'weights GiB':>11} {'first call s':>12}")
    print(header)
    for dtype in args.dtype:
        for size in args.latent:
            r = bench_case(config, size, args.batch, dtype, args.warmup, args.repeats,
                           None if args.no_torch else args.threads, args.compile, args.low_memory, args.widen, sgemm_n)
            gc.collect()  # the case's model, before the next one is built
            mx.clear_cache()
            rate = r["gflop"] / r["ours_s"]
            if "torch_s" in r:
                theirs = f"{r['torch_s']:11.3f} {r['ours_s'] / r['torch_s']:6.2f}"
                their_rates = f"{r['reference_gflop'] / r['torch_s']:17.1f} {r['torch_sgemm']:11.0f}"
            else:
                theirs, their_rates = f"{'-':>11} {'-':>6}", f"{'-':>17} {'-':>11}"
            print(f"{size:>6} {dtype:>8} {r['ours_s']:8.3f} {theirs} {r['gflop']:8.1f} {rate:8.1f} "
                  f"{r['sgemm']:6.0f} {rate / r['sgemm']:8.0%} {their_rates} {r['peak_gib']:8.2f} "
                  f"{r['weights_gib']:11.2f} {r['first_s']:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
