"""The reference side of our benchmarks: diffusers timed in a process of its own, as a torch user runs it.

``import mlx_unet`` loads OpenBLAS into the process with RTLD_GLOBAL before MLX loads (so that MLX's
BLAS calls reach it). In the same process torch's own BLAS calls then resolve to that OpenBLAS
too, whose worker threads stay busy-waiting after each product beside torch's OpenMP threads on
the same cores. Timed after our import, diffusers' UNet ran up to 1.8x slower than a torch user
sees it. So every benchmark times the reference here, in a child process that imports neither
MLX nor mlx_unet, with the same thread count, and reports the sgemm rate torch reaches in that
process beside the time, so that a slowed reference shows.

The parent calls :func:`run` (a job name and its JSON arguments); this module imports only
numpy, torch and diffusers, also when the parent imports it for :func:`make_unet_inputs`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_unet_inputs(config: dict, batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The UNet inputs both sides get (NHWC sample), from a diffusers UNet config dict."""
    rng = np.random.default_rng(seed)
    inputs = {
        "sample": rng.standard_normal((batch, size, size, config["in_channels"]), dtype=np.float32),
        "timestep": np.float32(500.0),
        "context": rng.standard_normal((batch, 77, config["cross_attention_dim"]), dtype=np.float32),
    }
    if config.get("addition_embed_type") == "text_time":
        inputs["time_ids"] = np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (batch, 1))
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["text_embeds"] = rng.standard_normal((batch, pooled), dtype=np.float32)
    return inputs


def median_seconds(call, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_sgemm_gflops(n: int) -> float:
    """torch's float32 n x n matmul rate in this process (best of two after a warm-up)."""
    import torch

    a = torch.randn(n, n)
    a @ a
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def unet_job(config: dict, batch: int, size: int, dtype: str, warmup: int, repeats: int, seed: int,
             sgemm_n: int) -> dict:
    """Median seconds of diffusers' UNet forward (built with ``torch.manual_seed(seed)``, as the
    parent builds the weights it hands to ours) on :func:`make_unet_inputs`."""
    import torch
    from diffusers import UNet2DConditionModel

    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).to(torch_dtype).eval()
    inputs = make_unet_inputs(config, batch, size)
    sample = torch.from_numpy(inputs["sample"]).permute(0, 3, 1, 2).contiguous().to(torch_dtype)
    context = torch.from_numpy(inputs["context"]).to(torch_dtype)
    added = {}
    if "time_ids" in inputs:
        added = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(inputs["text_embeds"]).to(torch_dtype),
                                       "time_ids": torch.from_numpy(inputs["time_ids"])}}

    def forward():
        with torch.no_grad():
            model(sample, float(inputs["timestep"]), context, **added)

    seconds = median_seconds(forward, warmup, repeats)
    return {"seconds": seconds, "sgemm": torch_sgemm_gflops(sgemm_n)}


JOBS = {"unet": unet_job}


def run(job: str, threads: int, **arguments) -> dict:
    """Run ``job`` in a fresh Python process with ``threads`` torch threads; returns its result."""
    proc = subprocess.run([sys.executable, str(Path(__file__)), job, str(threads), json.dumps(arguments)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference process failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    job, threads, arguments = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    import diffusers
    import torch

    if "mlx_unet" in sys.modules or "mlx" in sys.modules:
        raise RuntimeError("the reference process must not load MLX or mlx_unet")
    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    print(json.dumps(JOBS[job](**arguments)))


if __name__ == "__main__":
    main()
