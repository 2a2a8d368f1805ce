"""Our UNet forward against diffusers' (torch), side by side in one process.

    python benchmarks/bench_unet.py                                  # SDXL base, 32 and 64 latents, fp32, batch 1
    python benchmarks/bench_unet.py --latent 128 --batch 2 --dtype float16
    python benchmarks/bench_unet.py --latent 64 128 --batch 2 --dtype float16 --no-torch --low-memory
    python benchmarks/bench_unet.py --quick                          # tiny model: checks the benchmark runs

Both sides get the same weights (diffusers' model, handed to MLX tensor by tensor), the same
inputs and the same thread count. Reported per case: median seconds per forward after warm-up
(ours, diffusers, ratio), the FLOPs of one forward counted from the model's own layers and the
input shapes, the GFLOP/s that gives, that as a share of this machine's sgemm GFLOP/s (measured
between our timed forwards, median against median), and MLX's peak memory. The torch model is
timed first and freed before ours is built, so a full-size SDXL fits twice over in 24 GB.
``--compile`` runs our forward through mx.compile and reports the first call (trace and kernel
build) apart; ``--low-memory`` measures the low-memory mode of a run (pipelines/run.py).
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

import mlx_unet  # noqa: E402  (before mlx: the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import mlx.nn as nn  # noqa: E402
from mlx_unet import PRESETS, UNet2DConditionModel, UNetConfig, cpu  # noqa: E402
from mlx_unet.configs.base import DTYPES  # noqa: E402
from mlx_unet.models.attention import ScaledDotProductAttention  # noqa: E402
from mlx_unet.pipelines.run import RunSettings  # noqa: E402
from mlx_unet.weights import load_weights, torch_to_mlx_layout  # noqa: E402



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
    """float32 n x n matmul throughput on this machine: MLX's and torch's, the better of the two
    (each library's BLAS, with the process's thread settings)."""
    import torch

    a, t = mx.random.normal((n, n)), torch.randn(n, n)
    mx.eval(a)
    best = float("inf")
    for run in (lambda: mx.eval(a @ a), lambda: t @ t):
        run()  # warm-up: thread pool, packing buffers
        start = time.perf_counter()
        run()
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


def make_inputs(config: UNetConfig, batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {
        "sample": rng.standard_normal((batch, size, size, config.in_channels), dtype=np.float32),
        "timestep": np.float32(500.0),
        "context": rng.standard_normal((batch, 77, config.cross_attention_dim), dtype=np.float32),
    }
    if config.has_text_time_embedding:
        inputs["time_ids"] = np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (batch, 1))
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["text_embeds"] = rng.standard_normal((batch, pooled), dtype=np.float32)
    return inputs


def bench_case(config: UNetConfig, size: int, batch: int, dtype: str, warmup: int, repeats: int,
               with_torch: bool, compile: bool = False, low_memory: bool = False, sgemm_n: int = 4096) -> dict:
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    reference = TorchUNet(**config.to_diffusers_dict()).to(torch_dtype).eval()
    inputs = make_inputs(config, batch, size)
    result = {"latent": size, "batch": batch, "dtype": dtype}

    if with_torch:
        sample = torch.from_numpy(inputs["sample"]).permute(0, 3, 1, 2).contiguous().to(torch_dtype)
        context = torch.from_numpy(inputs["context"]).to(torch_dtype)
        added = {}
        if "time_ids" in inputs:
            added = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(inputs["text_embeds"]).to(torch_dtype),
                                           "time_ids": torch.from_numpy(inputs["time_ids"])}}

        def run_torch(model=reference):
            with torch.no_grad():
                model(sample, float(inputs["timestep"]), context, **added)

        result["torch_s"], _ = median_seconds(run_torch, warmup, repeats)

    # Hand the weights over tensor by tensor, freeing torch's copy as we go.
    state = reference.state_dict()
    del reference
    gc.collect()
    weights = {}
    for name in list(state):
        tensor = state.pop(name)
        weights[name] = mx.array(torch_to_mlx_layout(tensor.float().numpy())).astype(DTYPES[dtype])
        mx.eval(weights[name])
    ours = UNet2DConditionModel(config)
    load_weights(ours, weights)
    del weights, state
    gc.collect()

    args = (mx.array(inputs["sample"]), mx.array(inputs["timestep"]), mx.array(inputs["context"]))
    kwargs = {}
    if "time_ids" in inputs:
        kwargs = {"text_embeds": mx.array(inputs["text_embeds"]), "time_ids": mx.array(inputs["time_ids"])}
    with counting_flops() as flops:
        ours(*args, **kwargs)
    result["gflop"] = flops[0] / 1e9
    ours = cpu.prepare(ours)  # the CPU kernels unless MLX_UNET_CPU_KERNELS=0

    settings = RunSettings(compile=compile, low_memory=low_memory)
    forward = settings.forward(ours)
    with settings.applied():
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        mx.eval(forward(*args, **kwargs))
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

        result["ours_s"], sgemm = median_seconds(lambda: mx.eval(forward(*args, **kwargs)),
                                                 max(warmup - 1, 0), repeats, sample_sgemm)
        result["sgemm"] = statistics.median(sgemm)
        result["peak_gib"] = max(peaks + [mx.get_peak_memory()]) / 2**30
    result["weights_gib"] = sum(v.nbytes for _, v in tree_flatten(ours.parameters())) / 2**30
    del ours, forward
    gc.collect()
    mx.clear_cache()
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
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--no-torch", action="store_true", help="time only our forward")
    p.add_argument("--compile", action="store_true", help="our forward through mx.compile; the first call is reported apart")
    p.add_argument("--low-memory", action="store_true", help="our forward in a run's low-memory mode")
    p.add_argument("--quick", action="store_true", help="tiny model, one small case: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.family, args.latent, args.warmup, args.repeats = "tiny", [16], 1, 1

    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MLX_ENABLE_TF32", "0")
    config = UNetConfig.from_preset(args.family)
    blas = mlx_unet.cpu.blas.loaded or "MLX's bundled BLAS"
    mode = ", ".join(m for m, on in (("compiled", args.compile), ("low-memory", args.low_memory)) if on)
    print(f"{args.family}, batch {args.batch}{'; ' + mode if mode else ''}; torch {torch.__version__} on {args.threads} threads; MLX "
          f"{mx.__version__} ({mx.default_device()}, {blas})")
    sgemm_n = 512 if args.quick else 4096
    print(f"sgemm: the better of MLX's and torch's {sgemm_n}x{sgemm_n} float32 matmul, median of one "
          "measurement before each of our timed forwards")
    header = (f"{'latent':>6} {'dtype':>8} {'ours s':>8} {'diffusers s':>11} {'ratio':>6} {'GFLOP':>8} "
              f"{'GFLOP/s':>8} {'sgemm':>6} {'of sgemm':>8} {'peak GiB':>8} {'weights GiB':>11} {'first call s':>12}")
    print(header)
    for dtype in args.dtype:
        for size in args.latent:
            r = bench_case(config, size, args.batch, dtype, args.warmup, args.repeats, not args.no_torch,
                           args.compile, args.low_memory, sgemm_n)
            rate = r["gflop"] / r["ours_s"]
            theirs = f"{r['torch_s']:11.3f} {r['ours_s'] / r['torch_s']:6.2f}" if "torch_s" in r else f"{'-':>11} {'-':>6}"
            print(f"{size:>6} {dtype:>8} {r['ours_s']:8.3f} {theirs} {r['gflop']:8.1f} {rate:8.1f} "
                  f"{r['sgemm']:6.0f} {rate / r['sgemm']:8.0%} {r['peak_gib']:8.2f} {r['weights_gib']:11.2f} {r['first_s']:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
