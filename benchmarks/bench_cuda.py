"""SDXL at 1024x1024 on a GPU: our UNet on MLX's CUDA backend against diffusers on torch CUDA,
side by side in one process, and a rank-32 LoRA on every attention layer on both sides.

    pip install "mlx[cuda13]"   # or mlx[cuda12]; torch with CUDA and diffusers + peft beside it
    MLX_UNET_CPU_KERNELS=0 python benchmarks/bench_cuda.py
    python benchmarks/bench_cuda.py --latent 64 128 --batch 2 --repeats 10

The code path is the one a Mac runs (plain MLX: mx.fast attention, MLX's convolutions), here on
CUDA. Same random weights on both sides (diffusers' model handed over tensor by tensor), float16,
batch 2 (a guided step), 77 text tokens. Reported: median seconds per UNet forward (plain and
through mx.compile for ours), the ratio, MLX's peak memory; for the LoRA: the time to fuse it
and to remove it, and the cost per forward of running it live (ours: LoRALayer branches;
diffusers: PEFT's unmerged layers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import mlx_unet  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from mlx_unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from mlx_unet.lora import apply_lora, read_lora  # noqa: E402
from mlx_unet.pipelines.run import compiled_forward  # noqa: E402
from mlx_unet.weights import load_weights, torch_to_mlx_layout  # noqa: E402

_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
              "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def timed(run, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lora_factors(torch_unet, rank: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random (down, up) of a rank-``rank`` LoRA on every attention projection, by module path."""
    rng = np.random.default_rng(seed)
    factors = {}
    for name, module in torch_unet.named_modules():
        if name.endswith(_ATTENTION):
            out, inner = module.weight.shape
            factors[name] = ((rng.standard_normal((rank, inner)) / inner**0.5).astype(np.float16),
                             (rng.standard_normal((out, rank)) * 0.05).astype(np.float16))
    return factors


def bench_torch(unet, inputs, factors, args) -> dict:
    import torch

    sync = torch.cuda.synchronize if unet.device.type == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            unet(*inputs["args"], added_cond_kwargs=inputs["added"])
        sync()

    result = {"torch_s": timed(forward, args.warmup, args.repeats)}
    state = {}
    for name, (down, up) in factors.items():
        state[f"{name}.lora_A.weight"] = torch.from_numpy(down).to(unet.device, unet.dtype)
        state[f"{name}.lora_B.weight"] = torch.from_numpy(up).to(unet.device, unet.dtype)
    unet.load_lora_adapter(state, prefix=None, adapter_name="bench")
    wrapped = sum(1 for m in unet.modules() if hasattr(m, "lora_A") and "bench" in m.lora_A)
    assert wrapped == len(factors), (wrapped, len(factors))  # diffusers applied every module
    result["torch_live_s"] = timed(forward, args.warmup, args.repeats)
    sync()
    start = time.perf_counter()
    unet.fuse_lora()
    sync()
    result["torch_fuse_s"] = time.perf_counter() - start
    start = time.perf_counter()
    unet.unfuse_lora()
    sync()
    result["torch_unfuse_s"] = time.perf_counter() - start
    unet.delete_adapters("bench")
    return result


def bench_ours(unet, inputs, lora_path, args) -> dict:
    call = inputs["mlx"]
    forward = compiled_forward(unet)
    mx.reset_peak_memory()
    result = {"ours_s": timed(lambda: mx.eval(unet(*call[0], **call[1])), args.warmup, args.repeats),
              "peak_gib": mx.get_peak_memory() / 2**30}
    result["ours_compiled_s"] = timed(lambda: mx.eval(forward(*call[0], **call[1])), args.warmup + 1, args.repeats)
    lora = read_lora(lora_path)
    start = time.perf_counter()
    applied = apply_lora(unet, lora)
    result["fuse_s"] = time.perf_counter() - start
    start = time.perf_counter()
    applied.remove()
    result["unfuse_s"] = time.perf_counter() - start
    live = apply_lora(unet, lora, fuse=False)
    result["live_s"] = timed(lambda: mx.eval(unet(*call[0], **call[1])), args.warmup, args.repeats)
    result["live_compiled_s"] = timed(lambda: mx.eval(forward(*call[0], **call[1])), args.warmup + 1, args.repeats)
    live.remove()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, nargs="+", default=[128], help="latent sizes (default: 128 = 1024 px)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny model on whatever devices there are: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.latent, args.rank, args.warmup, args.repeats = [16], 4, 1, 1

    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32  # torch has no fast float16 on the CPU
    print(f"MLX {mx.__version__} on {mx.default_device()}; torch {torch.__version__} on {device}", flush=True)
    config = UNetConfig.from_preset("tiny" if args.quick else "sdxl-base")
    torch.manual_seed(0)
    reference = TorchUNet(**config.to_diffusers_dict()).to(device, dtype).eval()
    factors = lora_factors(reference, args.rank)
    tensors = {}
    for name, (down, up) in factors.items():
        kohya = "lora_unet_" + name.replace(".", "_")
        tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"] = down, up
    lora_path = Path(tempfile.mkdtemp()) / "rank.safetensors"
    save_file(tensors, str(lora_path))

    ours = UNet2DConditionModel(config)
    load_weights(ours, {k: mx.array(torch_to_mlx_layout(v.float().cpu().numpy())).astype(mx.float16)
                        for k, v in reference.state_dict().items()})
    rows = []
    for size in args.latent:
        rng = np.random.default_rng(size)
        sample = rng.standard_normal((args.batch, size, size, config.in_channels), dtype=np.float32)
        context = rng.standard_normal((args.batch, 77, config.cross_attention_dim), dtype=np.float32)
        width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pooled = rng.standard_normal((args.batch, width), dtype=np.float32)
        time_ids = np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (args.batch, 1))
        on = {k: torch.from_numpy(v).to(device, dtype) for k, v in (("pooled", pooled), ("context", context))}
        inputs = {
            "args": (torch.from_numpy(sample).permute(0, 3, 1, 2).contiguous().to(device, dtype), 500.0, on["context"]),
            "added": {"text_embeds": on["pooled"], "time_ids": torch.from_numpy(time_ids).to(device)},
            "mlx": ((mx.array(sample).astype(mx.float16), mx.array(500.0), mx.array(context).astype(mx.float16)),
                    {"text_embeds": mx.array(pooled).astype(mx.float16), "time_ids": mx.array(time_ids)}),
        }
        row = {"latent": size, **bench_torch(reference, inputs, factors, args), **bench_ours(ours, inputs, lora_path, args)}
        rows.append(row)
        print(row, flush=True)

    print(f"\n{'tiny' if args.quick else 'SDXL base'} UNet, float16 (torch: {dtype}), batch {args.batch}, rank-{args.rank} LoRA on {len(factors)} attention layers")
    print("latent | ours s (compiled) | diffusers s | ratio | peak GiB | live LoRA: ours +% / diffusers +% | "
          "fuse: ours s / diffusers s | remove: ours s / diffusers s")
    for r in rows:
        print(f"{r['latent']}x{r['latent']} | {r['ours_s']:.3f} ({r['ours_compiled_s']:.3f}) | {r['torch_s']:.3f} | "
              f"{r['ours_s'] / r['torch_s']:.2f} | {r['peak_gib']:.2f} | "
              f"{100 * (r['live_s'] / r['ours_s'] - 1):+.1f}% / {100 * (r['torch_live_s'] / r['torch_s'] - 1):+.1f}% | "
              f"{r['fuse_s']:.2f} / {r['torch_fuse_s']:.2f} | {r['unfuse_s']:.2f} / {r['torch_unfuse_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
