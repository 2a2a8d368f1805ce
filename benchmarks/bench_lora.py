"""A rank-32 LoRA on every attention projection of SDXL: fusing it, removing it, and what it costs
per step live; ours (mlx_unet.lora) against diffusers + PEFT, timed in a process of its own.

    python benchmarks/bench_lora.py                          # SDXL base fp32, rank 32, 32x32 latent, batch 1
    python benchmarks/bench_lora.py --dtype float16 --no-torch
    python benchmarks/bench_lora.py --batch 2 --repeats 3    # the batch classifier-free guidance runs
    python benchmarks/bench_lora.py --quick                  # tiny model: checks the benchmark runs

The UNet has the preset's architecture and diffusers' default random weights (built in torch,
handed to MLX tensor by tensor, so both sides hold the same weights). The LoRA is a random kohya
file, rank --rank, alpha = rank / 2 (so alpha / rank = 0.5 is applied), on to_q, to_k, to_v and
to_out.0 of attn1 and attn2 of every transformer block; each layer's update (at scale 1) has
--strength x its weight's RMS. Ours reads it with read_lora (timed apart) and applies it with
apply_lora; diffusers gets the same factors under PEFT's names (load_lora_adapter), fuses them
with fuse_lora / unfuse_lora and switches them with disable_lora / enable_lora.

Reported: the time to fuse (apply_lora(fuse=True), all its checks included) and to remove (bit
for bit), median of --repeats and the first call apart (it builds the compiled kernels and takes
fresh memory); MLX's peak memory during the fuse over what was resident before it; the share of
the touched elements the fuse had to record for an exact removal, and their bytes; the forward
without LoRA, with it live and fused, medians of interleaved repeats (each repeat: no LoRA, fuse,
fused forward, remove, attach live, live forward), and the live overhead; the LoRA's FLOPs over
the forward's (counted from the layers, as bench_unet.py). The bit-exact removal is checked on
every parameter after the timed repeats. diffusers runs first, float32 whatever --dtype (its
float16 CPU forward takes minutes), in a child process that loads neither MLX nor mlx_unet
(``torch_reference.py``: in this one, our OpenBLAS would slow torch), which reports torch's sgemm
rate beside its times and a digest of the LoRA it made, checked against ours; it ends before ours
is built: two float32 SDXL UNets do not fit in 24 GB together. Both sides use --threads threads
(torch's and OpenBLAS's).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_unet  # noqa: E402  (before mlx: the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from bench_unet import counting_flops  # noqa: E402
import torch_reference  # noqa: E402
from torch_reference import lora_factors, make_unet_inputs  # noqa: E402
from mlx_unet import UNet2DConditionModel, UNetConfig, cpu  # noqa: E402
from mlx_unet.configs.base import DTYPES  # noqa: E402
from mlx_unet.lora import apply_lora, read_lora  # noqa: E402
from mlx_unet.lora.layers import base_of, layer_at  # noqa: E402
from mlx_unet.weights import load_weights, torch_to_mlx_layout  # noqa: E402

# ---------------------------------------------------------------------- the LoRA


def write_kohya(path: Path, factors: dict[str, tuple], alpha: float) -> None:
    tensors = {}
    for module, (down, up) in factors.items():
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(tensors, str(path))


# ---------------------------------------------------------------------- measuring


def timed(fn) -> tuple:
    """(what ``fn()`` returns, the seconds it took)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def seconds(fn) -> float:
    return timed(fn)[1]


_LIBC = ctypes.CDLL(None)


def trim() -> None:
    """Freed memory back to the OS: torch frees into glibc's heap, which keeps it unless trimmed
    (without, the hand-over's peak resident memory is both models')."""
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def release_memory() -> None:
    gc.collect()
    mx.clear_cache()
    trim()


def progress(message: str, start: float) -> None:
    """A line on stderr (the table is on stdout): elapsed time and resident memory."""
    try:
        with open("/proc/self/statm") as f:
            resident = f" {int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB resident;"
    except (OSError, ValueError, IndexError):
        resident = ""
    print(f"[{time.perf_counter() - start:6.0f} s;{resident} {message}]", file=sys.stderr, flush=True)


def records(model, applied) -> tuple[int, int, int]:
    """(elements recorded, elements of the weights the fuse touched, bytes of the record)."""
    recorded = nbytes = touched = 0
    for update in applied.updates:
        touched += base_of(layer_at(model, update.path)).weight.size
        record = update.record
        if record is not None and record.indices is not None:
            recorded += record.indices.size
            nbytes += record.indices.nbytes + record.values.nbytes
    return recorded, touched, nbytes


def mlx_inputs(inputs: dict) -> tuple[tuple, dict]:
    args = (mx.array(inputs["sample"]), mx.array(inputs["timestep"]), mx.array(inputs["context"]))
    kwargs = {}
    if "time_ids" in inputs:
        kwargs = {"text_embeds": mx.array(inputs["text_embeds"]), "time_ids": mx.array(inputs["time_ids"])}
    return args, kwargs


def bench_ours(ours, lora_path: Path, inputs: dict, repeats: int) -> dict:
    """Per repeat: no LoRA, fuse, fused, remove, attach live, live; then the exactness check."""
    args, kwargs = mlx_inputs(inputs)

    def forward():
        mx.eval(ours(*args, **kwargs))

    def read():
        lora = read_lora(lora_path)
        mx.eval([f for part in lora.modules.values() for a in part.values() for f in a.factors()])
        return lora

    lora, read_s = timed(read)
    r = {"read_s": read_s}
    forward()  # warm-up
    live = apply_lora(ours, lora, fuse=False)
    forward()  # warm-up, live
    live.remove()
    times = {k: [] for k in ("base_s", "fuse_s", "fused_s", "remove_s", "attach_s", "live_s")}
    peaks = []
    for _ in range(repeats):
        times["base_s"].append(seconds(forward))
        mx.clear_cache()
        resident = mx.get_active_memory()
        mx.reset_peak_memory()
        applied, fuse_s = timed(lambda: apply_lora(ours, lora, fuse=True))
        times["fuse_s"].append(fuse_s)
        peaks.append(mx.get_peak_memory() - resident)
        r["recorded"], r["touched"], r["record_bytes"] = records(ours, applied)
        r["modules"] = applied.modules
        times["fused_s"].append(seconds(forward))
        times["remove_s"].append(seconds(applied.remove))
        applied, attach_s = timed(lambda: apply_lora(ours, lora, fuse=False))
        times["attach_s"].append(attach_s)
        times["live_s"].append(seconds(forward))
        applied.remove()
    r.update({k: statistics.median(v) for k, v in times.items()})
    r["first_fuse_s"] = times["fuse_s"][0]
    r["peak_over_gib"] = max(peaks) / 2**30
    r["weights_gib"] = sum(v.nbytes for _, v in tree_flatten(ours.parameters())) / 2**30

    # Bit for bit after remove: every parameter against the arrays held from before (the fuse puts
    # new arrays in the layers, so holding the old ones costs the touched weights' memory, once).
    before = tree_flatten(ours.parameters())
    applied = apply_lora(ours, lora, fuse=True)
    applied.remove()
    after = dict(tree_flatten(ours.parameters()))
    r["exact"] = len(before) == len(after) and all(same_bits(value, after[name]) for name, value in before)
    return r


def same_bits(a: mx.array, b: mx.array) -> bool:
    bits = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}.get(a.dtype, a.dtype)
    return a is b or (a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a.view(bits), b.view(bits)).item())


def lora_flops(config: UNetConfig, lora_path: Path, inputs: dict) -> tuple[float, float]:
    """GFLOP of one forward without the LoRA and of the live LoRA's branches, counted on a plain
    model (never evaluated: tracing reads shapes only)."""
    plain = UNet2DConditionModel(config)
    args, kwargs = mlx_inputs(inputs)
    with counting_flops() as base:
        plain(*args, **kwargs)
    apply_lora(plain, read_lora(lora_path), fuse=False)
    with counting_flops() as live:
        plain(*args, **kwargs)
    return base[0] / 1e9, (live[0] - base[0]) / 1e9


# ---------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default: 32; alpha is rank / 2)")
    p.add_argument("--strength", type=float, default=0.02,
                   help="each layer's update over its weight, RMS against RMS (default: 0.02)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="ours (diffusers: float32)")
    p.add_argument("--latent", type=int, default=32, help="latent height and width (default: 32)")
    p.add_argument("--batch", type=int, default=1, help="default 1 (as bench_unet.py); 2 is a CFG step")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of every measurement (default: 5)")
    p.add_argument("--threads", type=int, default=2, help="torch's and OpenBLAS's threads (default: 2)")
    p.add_argument("--no-torch", action="store_true", help="ours only")
    p.add_argument("--quick", action="store_true", help="tiny model, rank 4, one repeat: a smoke run")
    args = p.parse_args(argv)
    family = "sdxl-base"
    if args.quick:
        family, args.rank, args.latent, args.repeats = "tiny", 4, 16, 1

    import diffusers
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    mlx_unet.cpu.blas.set_threads(args.threads)  # MLX's matmuls run in OpenBLAS's threads
    os.environ.setdefault("MLX_ENABLE_TF32", "0")
    config = UNetConfig.from_preset(family)
    alpha = args.rank / 2
    inputs = make_unet_inputs(config.to_diffusers_dict(), args.batch, args.latent)

    start = time.perf_counter()
    theirs = None
    if not args.no_torch:
        # First, while this process holds no UNet: two float32 SDXL UNets do not fit in 24 GB.
        progress("diffusers + PEFT, in a process of its own", start)
        theirs = torch_reference.run("lora", args.threads, config=config.to_diffusers_dict(), batch=args.batch,
                                     size=args.latent, rank=args.rank, alpha=alpha, strength=args.strength,
                                     repeats=args.repeats, seed=0, sgemm_n=64 if args.quick else 4096)
    torch_s = time.perf_counter() - start
    progress(f"building diffusers' {family} UNet for its weights", start)
    torch.manual_seed(0)  # as the reference process did: the same weights
    reference = TorchUNet(**config.to_diffusers_dict()).eval()
    factors = lora_factors(reference, args.rank, alpha, args.strength)
    if theirs is not None and theirs["factors"] != torch_reference.factors_digest(factors):
        raise RuntimeError("the reference process made another LoRA than this one: the comparison would mean nothing")
    temp = tempfile.TemporaryDirectory(prefix="bench-lora-")
    lora_path = Path(temp.name) / "lora.safetensors"
    write_kohya(lora_path, factors, alpha)
    lora_mib = lora_path.stat().st_size / 2**20

    # Hand the weights over tensor by tensor, freeing torch's copy as we go.
    progress("handing the weights over", start)
    state = reference.state_dict()
    del reference
    release_memory()
    weights, handed = {}, 0
    for name in list(state):
        tensor = state.pop(name)
        weights[name] = mx.array(torch_to_mlx_layout(tensor.numpy())).astype(DTYPES[args.dtype])
        mx.eval(weights[name])
        handed += tensor.nbytes
        del tensor
        if handed > 2**30:
            trim()
            handed = 0
    del state
    release_memory()
    # Loaded into the plain model, then the CPU kernels (unless MLX_UNET_CPU_KERNELS=0) re-lay the
    # weights out one layer at a time; swapping them into a fresh model first would evaluate its
    # random initialisation (a third copy of the weights, and a minute).
    ours = UNet2DConditionModel(config)
    load_weights(ours, weights)
    del weights
    ours = cpu.prepare(ours)
    release_memory()
    gflop, lora_gflop = lora_flops(config, lora_path, inputs)
    progress("ours", start)
    mine = bench_ours(ours, lora_path, inputs, args.repeats)
    total_s = time.perf_counter() - start
    progress("done", start)
    temp.cleanup()

    blas = mlx_unet.cpu.blas.loaded or "MLX's bundled BLAS"
    touched = mine["touched"]
    parameters = sum(v.size for _, v in tree_flatten(ours.parameters()))
    print(f"{family}, ours {args.dtype} (MLX {mx.__version__}, {mx.default_device()}, {blas}), diffusers "
          f"{diffusers.__version__} float32 + PEFT (torch {torch.__version__}); {args.threads} threads")
    print(f"LoRA: kohya, rank {args.rank}, alpha {alpha:g}, on {mine['modules']} attention projections "
          f"({touched / 1e6:.0f} M weights, {touched / parameters:.0%} of {parameters / 1e6:.0f} M), "
          f"{sum(d.size + u.size for d, u in factors.values()) / 1e6:.1f} M parameters ({lora_mib:.0f} MiB file), "
          f"update RMS {args.strength:g} x weight RMS; read_lora {mine['read_s']:.2f} s")
    reference_line = ("diffusers + PEFT timed in a process of its own (torch_reference.py), torch's sgemm there "
                      f"{theirs['sgemm']:.0f} GFLOP/s" if theirs else "diffusers not run")
    print(f"forwards: {args.latent}x{args.latent} latent, batch {args.batch}; medians of {args.repeats} interleaved "
          f"repeats. {reference_line}")
    print(f"{'':<26} {'ours':>9} {'diffusers':>9} {'ratio':>6}")

    for label, key in (("fuse s", "fuse_s"), ("fuse s, first call", "first_fuse_s"), ("remove s", "remove_s"),
                       ("attach live s (*)", "attach_s"), ("forward s, no LoRA", "base_s"),
                       ("forward s, live LoRA", "live_s"), ("forward s, fused LoRA", "fused_s")):
        other = f"{theirs[key]:9.3f} {mine[key] / theirs[key]:6.2f}" if theirs else f"{'-':>9} {'-':>6}"
        print(f"{label:<26} {mine[key]:9.3f} {other}")
    for side in filter(None, (mine, theirs)):
        side["overhead"] = side["live_s"] / side["base_s"] - 1
    their_overhead = f"{theirs['overhead']:+9.1%}" if theirs else f"{'-':>9}"
    print(f"{'live overhead':<26} {mine['overhead']:+9.1%} {their_overhead} {'-':>6}")
    print(f"{'live LoRA FLOPs / forward':<26} {lora_gflop / gflop:+9.1%} {'(same)':>9} {'-':>6}")
    print(f"fuse: peak MLX memory {mine['peak_over_gib']:.3f} GiB over the resident {mine['weights_gib']:.2f} GiB "
          f"of weights (+ the LoRA's factors); recorded {mine['recorded'] / touched:.2%} of the touched elements "
          f"({mine['record_bytes'] / 2**20:.0f} MiB, kept while fused); remove bit-exact: "
          f"{'yes' if mine['exact'] else 'NO'} (every parameter)")
    print("(*) ours: apply_lora(fuse=False) of the file read; diffusers: load_lora_adapter of the tensors, once")
    print(f"(diffusers' process {torch_s:.0f} s; whole run {total_s:.0f} s)")
    return 0 if mine["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
