"""Loading a converted pipeline's parts against reading their files into memory, in one process.

    python benchmarks/bench_load.py --model DIR                 # a folder mlx-unet convert wrote
    python benchmarks/bench_load.py --model ~/.cache/mlx-unet/ENTRY   # a cache entry (linked parts too)
    python benchmarks/bench_load.py --model DIR --parts unet --repeats 3
    python benchmarks/bench_load.py --quick                     # the demo pipeline: checks the benchmark runs

Per part (UNet, text encoders, VAE), alternately: "read" reads the part's weights into fresh
memory with numpy (what any loader must at least do, the page faults of fresh memory included):
every weights file of a copied part, and the bytes of the source tensors a linked part names
(``mlx_unet.linked``: its share of a single file, say); "load" is the part's ``from_pretrained``
(headers and shapes checked, every tensor read, checked for NaN and inf, laid out for the CPU
kernels and copied into MLX). The median of --repeats each, and load over read. "cached read" is
the same bytes read into one reused buffer (what ``cat FILE > /dev/null`` measures: no fresh memory). Memory is given back
between runs (MLX's cache and the C heap). On a virtual machine the first touch of fresh memory
can cost more than the reading: both columns pay it, and it varies from run to run.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import mlx_unet  # noqa: E402  (before mlx: the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_unet import AutoencoderKL, CLIPTextModel, UNet2DConditionModel  # noqa: E402
from mlx_unet.demo import demo_pipeline  # noqa: E402
from mlx_unet.linked import has_links, read_links  # noqa: E402

LOADERS = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModel,
           "vae": AutoencoderKL}
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def give_back() -> None:
    gc.collect()
    mx.clear_cache()
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def weight_ranges(folder: Path) -> list[tuple[Path, int, int]]:
    """The byte ranges a part's weights take: its files whole, or the source tensors it links."""
    if has_links(folder):
        links, _ = read_links(folder)
        return sorted({(reader.path, *reader.byte_range(take.key, take.rows)) for reader, take in links.values()})
    return [(file, 0, file.stat().st_size) for file in sorted(folder.glob("*.safetensors"))]


def _read_into(ranges: list[tuple[Path, int, int]], buffer: np.ndarray, reuse: bool) -> None:
    offset = 0
    for path, begin, end in ranges:
        with open(path, "rb", buffering=0) as f:
            f.seek(begin)
            start = 0 if reuse else offset
            f.readinto(memoryview(buffer)[start:start + end - begin])
        offset += end - begin


def read_files(ranges: list[tuple[Path, int, int]]) -> float:
    start = time.perf_counter()
    arrays = np.empty(sum(end - begin for _, begin, end in ranges), np.uint8)  # fresh memory, as np.fromfile's
    _read_into(ranges, arrays, reuse=False)
    seconds = time.perf_counter() - start
    del arrays
    return seconds


def cached_read(ranges: list[tuple[Path, int, int]]) -> float:
    buffer = np.empty(max(end - begin for _, begin, end in ranges), np.uint8)
    start = time.perf_counter()
    _read_into(ranges, buffer, reuse=True)
    return time.perf_counter() - start


def load(part: str, folder: Path) -> float:
    start = time.perf_counter()
    model = LOADERS[part].from_pretrained(folder)
    seconds = time.perf_counter() - start
    del model
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a converted pipeline folder")
    p.add_argument("--parts", nargs="+", choices=list(LOADERS), default=list(LOADERS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="the demo pipeline, one run each")
    args = p.parse_args(argv)
    if (args.model is None) == (not args.quick):
        p.error("give --model DIR, or --quick")
    repeats = 1 if args.quick else args.repeats
    with demo_pipeline() if args.quick else nullcontext(args.model) as model:
        print(f"{model}: MLX {mx.__version__} ({mx.default_device()}, {mlx_unet.cpu.blas.loaded or 'its own BLAS'})")
        print(f"{'part':<24} {'GB':>6} {'read s':>7} {'GB/s':>5} {'load s':>7} {'load/read':>9} {'cached read s':>13}")
        for part in args.parts:
            folder = model / part
            if not folder.is_dir():
                continue
            files = weight_ranges(folder)
            size = sum(end - begin for _, begin, end in files) / 1e9
            cached_read(files)  # into the page cache, so that neither side reads the disk
            reads, loads = [], []
            for _ in range(repeats):
                reads.append(read_files(files))
                give_back()
                loads.append(load(part, folder))
                give_back()
            read, loaded = statistics.median(reads), statistics.median(loads)
            label = f"{part} (linked)" if has_links(folder) else part
            print(f"{label:<24} {size:6.2f} {read:7.2f} {size / read:5.2f} {loaded:7.2f} {loaded / read:9.2f} "
                  f"{cached_read(files):13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
