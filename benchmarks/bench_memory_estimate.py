"""The memory estimate (``mlx_unet.pipelines.memory``) against MLX's measured peak.

    python benchmarks/bench_memory_estimate.py                 # everything below, both code paths
    python benchmarks/bench_memory_estimate.py tiny --model DIR --sizes 64 256 --json

- ``tiny``: whole runs of a pipeline folder (default: the tests' tiny random one), per size,
  batch, guidance, tiling and low-memory setting: the prompt and denoising loop (output="latent")
  and then the decode, each measured as ``mx.get_peak_memory()`` from a reset, against the
  estimate's largest of "text encoders" and "denoise", and its "decode".
- ``unet``: one forward of SDXL base at full width (random weights, float32, 32x32 latent,
  batch 2 as under guidance) against the estimate's "denoise" (9.6 GiB of weights).
- ``vae``: SDXL's VAE decoder (random weights, float32) at 256 and 512 pixels against the decode's
  VAE part (its weights and activations).

Each kind runs in a subprocess per code path (``MLX_UNET_CPU_KERNELS=1`` / ``=0``), as the path
is chosen when models load. Prints a markdown table, or JSON rows with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a source checkout

import mlx_unet  # noqa: F401, I001  (before mlx: picks the fast BLAS on Linux)
import mlx.core as mx

from mlx_unet import AutoencoderKL, SDXLPipeline, UNet2DConditionModel, UNetConfig, VAEConfig, cpu
from mlx_unet.pipelines import memory, model_sizes

GIB = 2**30


def _peak(run) -> int:
    mx.clear_cache()
    mx.reset_peak_memory()
    result = run()  # decode returns numpy images: evaluated already
    if isinstance(result, mx.array):
        mx.eval(result)
    return mx.get_peak_memory()


def _row(case: str, estimate: int, measured: int) -> dict:
    path = "CPU kernels" if cpu.kernels_enabled() else "plain MLX"
    return {"case": case, "path": path, "estimate": estimate, "measured": measured}


def tiny_rows(folder: Path, sizes: list[int], quick: bool = False) -> list[dict]:
    pipe = SDXLPipeline.from_pretrained(folder)  # the defaults: float16, the VAE's own dtype
    parts = pipe.parts
    encoders = [e for e in parts.encoders if e is not None]
    rows = []
    settings = [(1, True, False, False), (2, True, False, False), (1, False, False, False),
                (2, True, True, False), (2, True, False, True)]
    if quick:
        settings = settings[1:2]
    for size in sizes:
        for images, guided, tiled, low_memory in settings:
            pipe.vae.use_tiling = tiled
            estimate = memory.estimate_run(parts.unet, parts.vae, encoders, height=size, width=size, images=images,
                                           guided=guided, dtype=pipe.dtype, vae_dtype=pipe.vae.dtype,
                                           tiled_vae=tiled, low_memory=low_memory)
            run = {"steps": 2, "guidance": 5.0 if guided else 1.0, "height": size, "width": size,
                   "num_images_per_prompt": images, "seed": 0, "low_memory": low_memory, "output": "latent"}
            latents = pipe("a lighthouse", **run)  # the decode's input; then the run measured again
            case = (f"tiny {size}px x{images}{' guided' if guided else ''}{' tiled' if tiled else ''}"
                    f"{' low-memory' if low_memory else ''}")
            stages = estimate.stages
            rows.append(_row(f"{case}: prompt + denoise", max(stages["text encoders"], stages["denoise"]),
                             _peak(partial(pipe, "a lighthouse", **run))))
            rows.append(_row(f"{case}: decode", stages["decode"], _peak(partial(pipe.decode, latents))))
    return rows


def unet_rows() -> list[dict]:
    config = UNetConfig.from_preset("sdxl-base")
    unet = cpu.prepare(UNet2DConditionModel(config))
    mx.eval(unet.parameters())
    batch, latent = 2, 32
    sample = mx.random.normal((batch, latent, latent, 4))
    context = mx.random.normal((batch, 77, config.cross_attention_dim))
    added = mx.random.normal((batch, config.time_embed_dim))
    estimate = (model_sizes.unet_parameters(config) * 4
                + memory.unet_activations(config, (latent, latent), batch, mx.float32, cpu.kernels_enabled()))
    measured = _peak(lambda: unet(sample, 500, context, added_embedding=added))
    return [_row(f"SDXL UNet forward, {latent}x{latent} latent x{batch}, float32", estimate, measured)]


def vae_rows(sizes: list[int]) -> list[dict]:
    config = VAEConfig.from_preset("sdxl")
    vae = cpu.prepare(AutoencoderKL(config))
    mx.eval(vae.parameters())
    rows = []
    for size in sizes:
        latents = mx.random.normal((1, size // 8, size // 8, 4))
        estimate = (model_sizes.vae_parameters(config) * 4
                    + memory.vae_decode_activations(config, (size, size), 1, mx.float32, cpu.kernels_enabled()))
        rows.append(_row(f"SDXL VAE decode {size}px, float32", estimate, _peak(partial(vae.decode, latents))))
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| case | code path | estimate GiB | measured GiB | estimate / measured |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['path']} | {r['estimate'] / GIB:.3f} | {r['measured'] / GIB:.3f} | "
                     f"{r['estimate'] / r['measured']:.2f} |")
    return "\n".join(lines)


def _in_subprocesses(kinds: list[str], extra: list[str]) -> list[dict]:
    rows = []
    for kind in kinds:
        for switch in ("1", "0"):
            env = {**os.environ, cpu.ENV_SWITCH: switch}
            out = subprocess.run([sys.executable, __file__, kind, "--json", *extra], env=env, check=True,
                                 capture_output=True, text=True).stdout
            rows.extend(json.loads(out))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", nargs="?", choices=["tiny", "unet", "vae"], help="one kind, on this process's code path")
    p.add_argument("--model", type=Path, help="tiny: a converted pipeline folder (default: the tests' tiny one)")
    p.add_argument("--sizes", type=int, nargs="+", help="pixels (tiny: 64 128 256 512; vae: 256 512)")
    p.add_argument("--quick", action="store_true", help="tiny: only 2 guided images per size (the tests' check)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = p.parse_args(argv)
    if args.kind is None:
        rows = _in_subprocesses(["tiny", "unet", "vae"], [])
    elif args.kind == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.model
            if folder is None:
                sys.path[:0] = [str(ROOT / "tests" / "bad_input"), str(ROOT / "tests")]
                from bad_input_helpers import write_pipeline

                folder = write_pipeline(Path(tmp) / "tiny")
            rows = tiny_rows(folder, args.sizes or [64, 128, 256, 512], args.quick)
    elif args.kind == "unet":
        rows = unet_rows()
    else:
        rows = vae_rows(args.sizes or [256, 512])
    print(json.dumps(rows) if args.json else _table(rows))


if __name__ == "__main__":
    main()
