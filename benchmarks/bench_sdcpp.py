"""Whole commands, prompt to PNG: ``mlx-unet generate`` against stable-diffusion.cpp's ``sd`` CLI.

    python benchmarks/bench_sdcpp.py --sd ~/stable-diffusion.cpp/build/bin/sd-cli \
        --workdir ~/sdxl-random
    python benchmarks/bench_sdcpp.py --workdir ~/sdxl-random          # ours only (no sd binary given)
    python benchmarks/bench_sdcpp.py --quick --sd ./sd-cli             # tiny components: checks the benchmark runs

Both run the same single-file SDXL checkpoint (Stability's layout, float16, as the Hub's files are):
SDXL base's architecture with seeded random weights, written from the random diffusers pipeline
of ``bench_text_to_image.py`` (built in the work dir, or reused from it). Same prompt, size, steps,
CFG scale, Euler sampler, seed and thread count. Each command runs in a fresh process; the table
gives its wall time and peak RSS (``wait4``), and, parsed from its own log, its load time and
step (ours: the median step; sd.cpp's: its sampling time over the steps). Ours runs twice per
dtype: "first" starts from an empty cache (what a first run does: the file's models, which need
no rounding, are linked into it rather than copied), "cached" reuses that entry (every later
run). The file is read into the page cache before each command, so that none reads the disk. sd.cpp runs at each
``--sd-type`` (its in-memory weight types). sd.cpp's build decides its speed: build it with
ggml's llamafile kernels and for this CPU (``cmake -B build -DGGML_LLAMAFILE=ON -DGGML_NATIVE=ON``).

Fresh memory: in a virtual machine whose host takes back the memory a guest frees (free page
reporting, ballooning), the first touch of a page costs far more than on bare metal, and a
command that starts right after another finds the pages that one freed still backed. Both
commands touch gigabytes, so the order alone could decide the table. Each command therefore starts
after ``--settle`` seconds of quiet (the state of a command run on its own), and the benchmark
prints what a GiB of fresh memory costs to touch after such a pause, so the figures can be read.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "parity"))  # the single-file writer

PROMPT = "a photo of an astronaut riding a horse on the moon, 35mm"
CFG = 5.0
SEED = 0


def single_file(workdir: Path, quick: bool) -> Path:
    """The random SDXL pipeline as one float16 safetensors file in Stability's layout (built once,
    in a process of its own: see ``in_own_process``)."""
    path = workdir / f"{'small-sdxl' if quick else 'sdxl-base'}-single-file-float16.safetensors"
    if not path.is_file():
        in_own_process(_write_single_file, path, quick)
    return path


def in_own_process(function, *args):
    """``function(*args)`` in a fresh Python process. A command's peak RSS as ``wait4`` reports it
    starts at this process's own peak (Linux copies the high-water mark through fork and exec), so
    whatever takes memory here (building the pipeline, 13 GiB; the fresh-memory probe) runs apart."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _write_single_file(path: Path, quick: bool) -> None:
    workdir, kind = path.parent, "small-sdxl" if quick else "sdxl-base"
    import bench_text_to_image  # noqa: E402  (torch and diffusers: only when the file is missing)
    import torch
    from original_layout import sdxl_single_file
    from safetensors.torch import load_file, save_file

    from mlx_unet import UNetConfig

    folder = workdir / f"{kind}-diffusers"
    if not (folder / "model_index.json").is_file():
        print(f"building a random {kind} pipeline in {folder}", flush=True)
        bench_text_to_image.build_diffusers_pipeline(folder, quick, _quick_configs() if quick else None)

    def part(name: str) -> dict:  # float16 shard by shard: the float32 pipeline need not fit in memory
        tensors = {}
        for shard in sorted((folder / name).glob("*.safetensors")):
            tensors |= {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(shard).items()}
        return tensors

    config = UNetConfig.from_dict(json.loads((folder / "unet" / "config.json").read_text()))
    tensors = sdxl_single_file(part("unet"), config, part("text_encoder_2"), part("vae"), part("text_encoder"))
    print(f"writing {path}", flush=True)
    save_file(tensors, str(path.with_suffix(".partial")))
    path.with_suffix(".partial").rename(path)


def _quick_configs() -> tuple:
    """Small, but with SDXL's text widths (a single file's family is told by them): one text layer
    each, a narrow UNet and VAE."""
    from mlx_unet import CLIPTextConfig, UNetConfig, VAEConfig

    small = dict(num_hidden_layers=1, intermediate_size=64)
    return (UNetConfig.from_preset("sdxl-base", block_out_channels=[64, 128, 128], attention_head_dim=[1, 2, 2],
                                   transformer_layers_per_block=[1, 2, 3]),
            CLIPTextConfig.from_preset("sdxl-clip-l", **small), CLIPTextConfig.from_preset("sdxl-clip-bigg", **small),
            VAEConfig.from_preset("sdxl", block_out_channels=[32, 32, 64, 64], layers_per_block=1))


def timed(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command``; its wall seconds, peak RSS (GiB), memory faulted in (GiB) and output
    (stdout and stderr together)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{command[0]} failed (exit {code}):\n{output[-3000:]}")
    # Minor faults: pages first touched (or mapped from the page cache) without I/O.
    return {"total": seconds, "rss": usage.ru_maxrss / 2**20, "faulted": usage.ru_minflt * mmap.PAGESIZE / 2**30,
            "log": output}


def ours(model: Path, out: Path, size: int, steps: int, dtype: str, threads: int, cache: Path) -> dict:
    env = dict(os.environ, MLX_UNET_CACHE=str(cache), OPENBLAS_NUM_THREADS=str(threads))
    result = timed([sys.executable, "-m", "mlx_unet", "generate", PROMPT, "--model", str(model), "--height", str(size),
                    "--width", str(size), "--steps", str(steps), "--guidance", str(CFG), "--scheduler", "euler",
                    "--seed", str(SEED), "--dtype", dtype, "-o", str(out)], env)
    log = result["log"]
    loaded = re.search(r"in ([\d.]+) s; seed", log)
    # The progress line redraws itself with \r: "denoise  [###   ] 2/4  9.87 s/step".
    steps_seen = [float(s) for s in re.findall(r"\d+/\d+\s+([\d.]+) s/step", log)][:steps]
    return result | {"load": float(loaded.group(1)) if loaded else None,
                     "step": statistics.median(steps_seen) if steps_seen else None}


def sdcpp(binary: Path, model: Path, out: Path, size: int, steps: int, weight_type: str, threads: int) -> dict:
    result = timed([str(binary), "-m", str(model), "-p", PROMPT, "-n", "", "-H", str(size), "-W", str(size),
                    "--steps", str(steps), "--cfg-scale", str(CFG), "--sampling-method", "euler", "-s", str(SEED),
                    "-t", str(threads), "--type", weight_type, "-o", str(out), "-v"], dict(os.environ))
    log = result["log"]
    loaded = re.search(r"loading tensors completed, taking ([\d.]+)s", log)
    sampled = re.search(r"sampling completed, taking ([\d.]+)s", log)  # sd.cpp logs no single step's time
    return result | {"load": float(loaded.group(1)) if loaded else None,
                     "step": float(sampled.group(1)) / steps if sampled else None}


def into_page_cache(path: Path) -> None:
    """Read ``path`` once through one reused buffer, so that no command reads the disk: a first
    command would otherwise pay for a file that earlier work pushed out of the page cache."""
    buffer = bytearray(64 * 2**20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def fresh_memory_seconds_per_gib(gib: float = 0.5) -> float:
    """Seconds per GiB to first touch memory the process never had (one write per 4 KiB page)."""
    size = int(gib * 2**30)
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as pages:
        start = time.perf_counter()
        for offset in range(0, size, mmap.PAGESIZE):
            pages[offset] = 1
        return (time.perf_counter() - start) / gib


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", type=Path, help="stable-diffusion.cpp's CLI (sd or sd-cli); without it, ours only")
    p.add_argument("--sd-type", nargs="+", default=["f16"], help="sd.cpp's weight types (default: f16)")
    p.add_argument("--dtype", nargs="+", choices=["float32", "float16"], default=["float32", "float16"],
                   help="ours (default: both)")
    p.add_argument("--size", type=int, help="image height and width in pixels (default: 256; 64 with --quick)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (default: 4)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both (default: all cores)")
    p.add_argument("--workdir", type=Path, required=True,
                   help="where the random pipeline and its single file are kept (needs about 20 GB)")
    p.add_argument("--settle", type=float,
                   help="seconds of quiet before each command (default: 45; 0 with --quick), see Fresh memory below")
    p.add_argument("--quick", action="store_true", help="tiny components: a smoke run")
    args = p.parse_args(argv)
    size = args.size or (64 if args.quick else 256)
    settle = args.settle if args.settle is not None else (0 if args.quick else 45)
    if not 0 <= settle < float("inf"):
        p.error(f"--settle {args.settle} is not a number of seconds (0 or more)")
    if args.sd is not None and not (args.sd.is_file() and os.access(args.sd, os.X_OK)):
        p.error(f"--sd {args.sd} is not an executable file")
    workdir = args.workdir.expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    model = single_file(workdir, args.quick)
    out = workdir / "bench-sdcpp"
    out.mkdir(exist_ok=True)

    time.sleep(settle)
    fresh = in_own_process(fresh_memory_seconds_per_gib)
    rows = []
    for dtype in args.dtype:
        cache = out / f"cache-{dtype}"
        shutil.rmtree(cache, ignore_errors=True)
        for run in ("first", "cached"):
            print(f"ours {dtype}, {run} run", flush=True)
            into_page_cache(model)
            time.sleep(settle)
            rows.append((f"mlx-unet {dtype}, {run}", ours(model, out / f"ours-{dtype}.png", size, args.steps, dtype,
                                                          args.threads, cache)))
        shutil.rmtree(cache)
    for weight_type in args.sd_type if args.sd else []:
        print(f"sd.cpp {weight_type}", flush=True)
        into_page_cache(model)
        time.sleep(settle)
        rows.append((f"sd.cpp {weight_type}", sdcpp(args.sd, model, out / f"sd-{weight_type}.png", size, args.steps,
                                                    weight_type, args.threads)))

    print(f"\n{model.name}: {size}x{size} px, {args.steps} Euler steps, CFG {CFG}, {args.threads} threads; "
          f"each command after {settle:g} s of quiet, when fresh memory cost {fresh:.2f} s/GiB to touch")
    print(f"{'command':<28} {'total s':>8} {'load s':>7} {'step s':>7} {'peak RSS GiB':>13} {'faulted GiB':>12}")
    for name, r in rows:
        print(f"{name:<28} {r['total']:>8.1f} {_cell(r['load']):>7} {_cell(r['step'], 2):>7} {r['rss']:>13.2f} "
              f"{r['faulted']:>12.2f}")
    if not args.sd:
        print("(no --sd given: sd.cpp not run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
