"""Quantized SDXL: what each layer group costs, how close 8 and 4 bits stay to the dense model,
and the memory a quantized run takes.

    python benchmarks/bench_quantize.py sensitivity --workdir /tmp/q   # the table behind DENSE_AT_8_BITS
    python benchmarks/bench_quantize.py fidelity --workdir /tmp/q      # 8/4 bits x groups, PSNR of whole runs
    python benchmarks/bench_quantize.py memory --workdir /tmp/q        # resident UNet, a 1024x1024 run's peak
    python benchmarks/bench_quantize.py matmul --workdir /tmp/q        # quantized products on this CPU
    python benchmarks/bench_quantize.py all --quick                    # tiny components: a smoke run

Every figure compares a quantized model with the same model dense, in float16 (both on this
process's code path: MLX_UNET_CPU_KERNELS=0 for plain MLX). The weights are full-size SDXL base
drawn like trained ones (tests/parity/quantize_weights.py: Laplace draws, log-normal row and
column scales, outlier channels; uniform random weights quantize far better than trained ones),
saved once as a pipeline folder in --workdir (7 GB) and reused.

- sensitivity: the UNet's output at a 32x32 latent with one layer group alone quantized (4 and
  8 bits, groups of 64), its share of the parameters and of the summed squared error;
  convolutions are rounded through the quantizer in place (MLX has no quantized convolution, so
  this is what one would cost); the text-encoder row is OpenCLIP bigG's penultimate states and
  pooled output with all its Linear layers quantized.
- fidelity: the UNet's output error with the policy's layers quantized, 8 and 4 bits x groups of
  32, 64, 128; the PSNR of whole runs (same seed, 256x256, Euler) quantized against dense.
- memory: MLX's active memory of the UNet loaded quantized (and its peak while loading, a dense
  folder quantized as it loads), and the peak of a whole 1024x1024 run at 4 bits: batch 2 under
  guidance, the VAE in generate --tile-vae's tiles, text encoders 8-bit and freed before
  denoising; 1 step unless --steps.
- matmul: MLX's quantized_matmul against dequantizing for a float32 BLAS product (what the CPU
  kernels do) and the dense products, in GFLOP/s.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a source checkout
sys.path[1:1] = [str(ROOT / "tests" / "parity"), str(ROOT / "tests" / "bad_input"), str(ROOT / "tests")]

import mlx_unet  # noqa: F401, I001  (before mlx: picks the fast BLAS on Linux)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from bad_input_helpers import write_pipeline
from quantize_weights import describe, fake_quantize_convs, psnr, quantize_in_place, restore_conv_weights, \
    swap_modules, trained_like, trained_like_weight

from mlx_unet import CLIPTextModel, SDXLPipeline, UNet2DConditionModel, cpu
from mlx_unet.configs.quantization import Quantization
from mlx_unet.cpu.quantized import QuantizedLinear as CPUQuantizedLinear
from mlx_unet.pipelines import memory, model_sizes
from mlx_unet.quantize import ATTENTION, CONVOLUTIONS, DENSE_AT_8_BITS, EMBEDDINGS, FEED_FORWARD, PROJECTIONS, \
    layer_group, quantizable_paths

GIB = 2**30
UNET_GROUPS = (ATTENTION, FEED_FORWARD, PROJECTIONS, EMBEDDINGS, CONVOLUTIONS)
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def pipeline_folder(workdir: Path, quick: bool) -> Path:
    """The trained-like pipeline folder (written on first use; float16 UNet and text encoders)."""
    folder = workdir / ("tiny" if quick else "sdxl")
    if not (folder / "model_index.json").exists():
        start = time.perf_counter()
        print(f"writing {folder} ({describe()}) ...", file=sys.stderr, flush=True)
        write_pipeline(folder.with_suffix(".partial"), seed=0, size="tiny" if quick else "sdxl", dtype=mx.float16,
                       redraw=lambda model: trained_like(model, seed=0))
        folder.with_suffix(".partial").rename(folder)
        print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return folder


def relative_error(value: mx.array, reference: mx.array) -> float:
    a, b = np.array(value.astype(mx.float32), np.float64), np.array(reference.astype(mx.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def unet_inputs(unet: UNet2DConditionModel, latent: int) -> tuple:
    """A fixed sample, timestep and conditioning (standard normal text states: the scale CLIP's
    normalised outputs have)."""
    c = unet.config
    key = mx.random.key(1)
    k1, k2, k3 = mx.random.split(key, 3)
    dtype = mx.float16
    sample = mx.random.normal((1, latent, latent, 4), key=k1).astype(dtype)
    context = mx.random.normal((1, 77, c.cross_attention_dim), key=k2).astype(dtype)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    text_embeds = mx.random.normal((1, pooled), key=k3).astype(dtype)
    size = latent * 8
    time_ids = mx.array([[size, size, 0, 0, size, size]], dtype)
    return sample, mx.array([500]), context, dict(text_embeds=text_embeds, time_ids=time_ids)


def _run_unet(unet, inputs) -> mx.array:
    sample, t, context, added = inputs
    out = unet(sample, t, context, **added)
    mx.eval(out)
    return out


def _parameter_count(model: nn.Module, paths) -> int:
    modules = dict(model.named_modules())
    return sum(modules[p].weight.size + (modules[p].bias.size if "bias" in modules[p] else 0) for p in paths)


def _layers_of(model: nn.Module, kind) -> dict[str, list[str]]:
    by_group: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, kind):
            by_group.setdefault(layer_group(path), []).append(path)
    return by_group


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def sensitivity(folder: Path, latent: int) -> str:
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=mx.float16)
    inputs = unet_inputs(unet, latent)
    dense = _run_unet(unet, inputs)
    total = sum(v.size for _, v in tree_flatten(unet.parameters()))
    linear = _layers_of(unet, nn.Linear)
    convs = _layers_of(unet, nn.Conv2d).get(CONVOLUTIONS, [])
    rows, errors = [], {}
    for bits in (4, 8):
        q = Quantization.make(bits, 64)
        for group in UNET_GROUPS:
            if group == CONVOLUTIONS:
                paths = [p for p in convs if dict(unet.named_modules())[p].weight.shape[-1] % q.group_size == 0]
                taken = fake_quantize_convs(unet, paths, q)
                errors[bits, group] = relative_error(_run_unet(unet, inputs), dense)
                restore_conv_weights(unet, taken)
            else:
                paths = [p for p in linear.get(group, []) if dict(unet.named_modules())[p].weight.shape[1] % 64 == 0]
                taken = quantize_in_place(unet, paths, q)
                errors[bits, group] = relative_error(_run_unet(unet, inputs), dense)
                swap_modules(unet, taken)
            if bits == 4:
                rows.append([group, f"{100 * _parameter_count(unet, paths) / total:.1f}%"])
            print(f"  {bits}-bit {group}: {errors[bits, group]:.2e}", file=sys.stderr, flush=True)
    del unet
    for row in rows:
        for bits in (4, 8):
            squares = sum(errors[bits, g] ** 2 for g in UNET_GROUPS)
            row += [f"{errors[bits, row[0]]:.2e}", f"{100 * errors[bits, row[0]] ** 2 / squares:.0f}%"]
    text = text_encoder_errors(folder)
    rows.append(["text-encoder layers (bigG; of its parameters)", text.pop("share"), *text.values()])
    return _table(["layer group (UNet)", "parameters", "4-bit error", "4-bit share", "8-bit error", "8-bit share"],
                  rows)


def text_encoder_errors(folder: Path) -> dict[str, str]:
    """bigG's output error with all its Linear layers quantized at 4 and 8 bits (groups of 64)."""
    model = CLIPTextModel.from_pretrained(folder / "text_encoder_2", dtype=mx.float16)
    ids = mx.array(np.random.default_rng(2).integers(0, 49406, (1, 77)))
    dense = model(ids)
    mx.eval(dense)
    out = {}
    for bits in (4, 8):
        q = Quantization.make(bits, 64)
        paths = quantizable_paths(model, q, dense=())
        out["share"] = f"{100 * _parameter_count(model, paths) / sum(v.size for _, v in tree_flatten(model.parameters())):.1f}%"
        taken = quantize_in_place(model, paths, q)
        got = model(ids)
        out[f"{bits}"] = f"{relative_error(got[0], dense[0]):.2e} (pooled {relative_error(got[1], dense[1]):.2e})"
        out[f"{bits} share"] = "-"
        swap_modules(model, taken)
    return out


def weight_errors() -> str:
    """One trained-like (1280 -> 5120) float16 weight's own rounding error: what the model's output
    errors are to be read against."""
    w = mx.array(trained_like_weight((5120, 1280), 0, "weight")).astype(mx.float16)
    rows = []
    for bits in (8, 4):
        row = [f"{bits}-bit"]
        for group_size in (32, 64, 128):
            rounded = mx.dequantize(*mx.quantize(w, group_size, bits), group_size=group_size, bits=bits)
            row.append(f"{relative_error(rounded, w):.2e}")
        rows.append(row)
    return _table(["one weight, relative error", "groups of 32", "groups of 64", "groups of 128"], rows)


def fidelity(folder: Path, latent: int, steps: int) -> str:
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=mx.float16)
    inputs = unet_inputs(unet, latent)
    dense = _run_unet(unet, inputs)
    rows = []
    for bits in (8, 4):
        row = [f"{bits}-bit"]
        for group_size in (32, 64, 128):
            q = Quantization.make(bits, group_size)
            taken = quantize_in_place(unet, quantizable_paths(unet, q), q)
            row.append(f"{relative_error(_run_unet(unet, inputs), dense):.2e}")
            swap_modules(unet, taken)
        rows.append(row)
    # The other choice at each width, groups of 64: what the dense groups buy (see DENSE_AT_8_BITS).
    for bits, dense_set, label in ((8, (), "8-bit, every Linear"),
                                   (4, DENSE_AT_8_BITS, f"4-bit, {' and '.join(sorted(DENSE_AT_8_BITS))} dense")):
        q = Quantization.make(bits, 64)
        taken = quantize_in_place(unet, quantizable_paths(unet, q, dense=dense_set), q)
        rows.append([label, "", f"{relative_error(_run_unet(unet, inputs), dense):.2e}", ""])
        swap_modules(unet, taken)
    del unet, dense
    unet_table = _table(["UNet output, relative error (the policy)", "groups of 32", "groups of 64",
                         "groups of 128"], rows)

    size = latent * 8
    run = dict(steps=steps, height=size, width=size, seed=0, guidance=5.0)
    reference = SDXLPipeline.from_pretrained(folder)(PROMPT, **run)
    rows = []
    for bits, text in ((8, None), (4, None), (4, False)):
        pipe = SDXLPipeline.from_pretrained(folder, quantize=bits, quantize_text_encoders=text)
        images = pipe(PROMPT, **run)
        del pipe
        encoders = "dense" if text is False else "8-bit"
        rows.append([f"UNet {bits}-bit, groups of 64; text encoders {encoders}", f"{psnr(images, reference):.1f} dB"])
    return unet_table + "\n\n" + _table([f"whole run, {size}x{size}, {steps} steps, against dense", "PSNR"], rows)


def code_path() -> str:
    return "the CPU kernels" if cpu.kernels_enabled() else "plain MLX"


def _measure(fn):
    """``fn()``, and MLX's active memory before and after it and its peak while it ran (absolute:
    what was allocated before counts)."""
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    result = fn()
    return result, before, mx.get_active_memory(), mx.get_peak_memory()


def memory_figures(folder: Path, size: int, steps: int) -> str:
    rows = []
    for bits in (None, 8, 4):
        q = None if bits is None else Quantization.make(bits, 64)
        unet, before, after, peak = _measure(
            lambda: UNet2DConditionModel.from_pretrained(folder / "unet", dtype=mx.float16, quantize=q))
        estimate = model_sizes.unet_bytes(unet.config, 2, q)
        rows.append([f"UNet {'dense' if q is None else q.describe()}", f"{(after - before) / GIB:.3f} GiB",
                     f"{(peak - before) / GIB:.3f} GiB", f"{estimate / GIB:.3f} GiB"])
        del unet
    table = _table(["float16", "resident (MLX active)", "peak while loading", "estimate"], rows)

    pipe = SDXLPipeline.from_pretrained(folder, quantize=4)
    tile = memory.command_tile(pipe.vae.config)  # as generate --tile-vae
    pipe.vae.enable_tiling(tile)
    denoised = []  # the peak so far after the last step: the text encoders' and the denoising's

    def after_step(stage, step) -> None:
        denoised[:] = [mx.get_peak_memory()]

    start = time.perf_counter()
    images, loaded, _, peak = _measure(lambda: pipe(PROMPT, steps=steps, height=size, width=size, seed=0,
                                                    guidance=5.0, callback=after_step))
    seconds = time.perf_counter() - start
    parts = pipe.parts
    estimate = memory.estimate_run(
        parts.unet, parts.vae, [e for e in parts.encoders if e is not None], height=size, width=size, images=1,
        guided=True, dtype=mx.float16, vae_dtype=pipe.vae.dtype, tiled_vae=True, vae_tile=tile, low_memory=False,
        unet_quantization=parts.quantization("unet", pipe.quantize),
        text_quantization=parts.quantization("text_encoder_2", pipe.quantize_text_encoders))
    return table + "\n\n" + _table(
        [f"whole {size}x{size} run, UNet 4-bit (groups of 64), text encoders 8-bit, VAE in {tile} px tiles", "value"],
        [["loaded before the call (UNet, VAE)", f"{loaded / GIB:.3f} GiB"],
         ["peak through the text encoders and denoising (MLX)", f"{denoised[0] / GIB:.3f} GiB"],
         ["peak of the whole run, decode included (MLX)", f"{peak / GIB:.3f} GiB"],
         ["estimate (pipelines/memory.py)", f"{estimate.peak / GIB:.3f} GiB ({estimate.describe()})"],
         [f"time, {steps} step(s) on {code_path()}", f"{seconds:.0f} s"],
         ["image", f"{images.shape}, std {images.std():.1f}"]])


def _seconds(fn, repeats: int = 3) -> float:
    mx.eval(fn())  # warm-up (and the CPU kernels' first-call layouts)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def matmul_speed(tokens: int) -> str:
    """A feed-forward product of SDXL's innermost level, (tokens, 1280) x (1280 -> 5120): MLX's
    quantized_matmul (what plain MLX runs) against the CPU kernels' way (dequantize the weight,
    then a float32 BLAS product) and the dense float32 and float16 products."""
    x = mx.random.normal((tokens, 1280), key=mx.random.key(3))
    w = mx.random.normal((5120, 1280), key=mx.random.key(4)) / 36
    flop = 2 * tokens * 1280 * 5120
    rows = []
    for name, dtype in (("dense float32", mx.float32), ("dense float16", mx.float16)):
        xd, wd = x.astype(dtype), w.astype(dtype)
        mx.eval(xd, wd)
        rows.append([name, _seconds(lambda: xd @ wd.T)])
    for bits in (8, 4):
        q = Quantization.make(bits, 64)
        for dtype in (mx.float16, mx.float32):
            linear = nn.Linear(1280, 5120, bias=False)
            linear.weight = w.astype(dtype)
            layer = nn.QuantizedLinear.from_linear(linear, q.group_size, q.bits)
            xq = x.astype(dtype)
            mx.eval(layer.parameters(), xq)
            rows.append([f"{bits}-bit {dtype_name(dtype)}, nn.QuantizedLinear (plain MLX: quantized_matmul)",
                         _seconds(lambda: layer(xq), repeats=1)])
            if dtype == mx.float16:  # the models' case
                fast = CPUQuantizedLinear.from_module(layer)
                rows.append([f"{bits}-bit float16, CPU kernels (dequantize, float32 BLAS)", _seconds(lambda: fast(xq))])
    return _table([f"({tokens}, 1280) x (1280 -> 5120) on {mx.default_device()}", "ms", "GFLOP/s"],
                  [[name, f"{1e3 * t:.1f}", f"{flop / t / 1e9:.1f}"] for name, t in rows])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["sensitivity", "fidelity", "memory", "matmul", "all"])
    p.add_argument("--workdir", type=Path, required=True, help="where the random pipeline folder is kept")
    p.add_argument("--quick", action="store_true", help="tiny components at tiny sizes: a smoke run")
    p.add_argument("--steps", type=int, help="memory: denoising steps (default 1); fidelity: (default 8)")
    args = p.parse_args(argv)
    if args.what in ("matmul", "all"):
        print(matmul_speed(4 if args.quick else 128) + "\n")
        if args.what == "matmul":
            return
    folder = pipeline_folder(args.workdir, args.quick)
    latent = 8 if args.quick else 32
    print(f"{describe()}; code path: {code_path()}\n")
    if args.what in ("sensitivity", "all"):
        print(sensitivity(folder, latent) + "\n")
    if args.what in ("fidelity", "all"):
        print(weight_errors() + "\n\n" + fidelity(folder, latent, args.steps or (2 if args.quick else 8)) + "\n")
    if args.what in ("memory", "all"):
        print(memory_figures(folder, 64 if args.quick else 1024, args.steps or 1) + "\n")


if __name__ == "__main__":
    main()
