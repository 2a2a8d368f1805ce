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

import hashlib
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

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


def random_module(cls, *args, seed: int, **kwargs) -> torch.nn.Module:
    """``cls(*args, **kwargs)`` allocated once (on the meta device first, so no default init runs)
    with every parameter drawn uniformly from ``seed``: norm scales around 1 and shifts around 0, not
    exactly 1 and 0, and weights scaled for unit-variance outputs."""
    import torch

    with torch.device("meta"):
        model = cls(*args, **kwargs)
    model = model.to_empty(device="cpu")
    for name, buffer in model.named_buffers():  # to_empty leaves buffers as garbage; CLIP has one
        if not name.endswith("position_ids"):
            raise RuntimeError(f"unexpected buffer {name}: fill it here")
        buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            values = rng.random(p.shape, dtype=np.float32)
            half, centre = ((3.0 / p[0].numel()) ** 0.5, 0.0) if p.ndim >= 2 else (0.35, float(name.endswith("weight")))
            p.copy_(torch.from_numpy(values * (2 * half) + (centre - half)))
    return model.eval()


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


def seeded_unet_forward(config: dict, batch: int, size: int, dtype: str, seed: int):
    """diffusers' UNet built with ``torch.manual_seed(seed)`` (as the parents build the weights
    they hand to ours) in ``dtype``, and a no-grad call of it on :func:`make_unet_inputs`:
    (model, forward)."""
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

    return model, forward


def unet_job(config: dict, batch: int, size: int, dtype: str, warmup: int, repeats: int, seed: int,
             sgemm_n: int) -> dict:
    """Median seconds of diffusers' UNet forward (:func:`seeded_unet_forward`)."""
    _, forward = seeded_unet_forward(config, batch, size, dtype, seed)
    seconds = median_seconds(forward, warmup, repeats)
    return {"seconds": seconds, "sgemm": torch_sgemm_gflops(sgemm_n)}


def attention_job(shapes: list[list[int]], warmup: int, repeats: int, seed: int, sgemm_n: int) -> dict:
    """Median seconds of torch's ``scaled_dot_product_attention`` (what diffusers' attention
    calls) per (batch, heads, query tokens, key tokens, head width), float32."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    seconds = []
    for batch, heads, tokens, keys, width in shapes:
        q, k, v = (torch.randn(batch, heads, n, width) for n in (tokens, keys, keys))
        with torch.no_grad():
            seconds.append(median_seconds(lambda: F.scaled_dot_product_attention(q, k, v), warmup, repeats))
    return {"seconds": seconds, "sgemm": torch_sgemm_gflops(sgemm_n)}


# ---------------------------------------------------------------------- a LoRA through PEFT

ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def lora_factors(reference, rank: int, alpha: float, strength: float, seed: int = 0) -> dict[str, tuple]:
    """Module path -> (down (rank, in), up (out, rank)), float32, for every attention projection of
    the torch model: random, sized so that alpha / rank * up @ down has ``strength`` x the RMS of
    the layer's weight (down ~ N(0, 1/in), up ~ N(0, c^2): the product's RMS is c sqrt(rank / in))."""
    import torch

    rng = np.random.default_rng(seed)
    factors = {}
    for path, module in reference.named_modules():
        if not (ATTENTION.search(path) and isinstance(module, torch.nn.Linear)):
            continue
        out, inner = module.weight.shape
        weight_rms = float(module.weight.detach().double().pow(2).mean().sqrt())
        c = strength * weight_rms * rank / alpha * (inner / rank) ** 0.5
        down = rng.standard_normal((rank, inner), dtype=np.float32) / np.float32(inner ** 0.5)
        up = rng.standard_normal((out, rank), dtype=np.float32) * np.float32(c)
        factors[path] = (down, up)
    return factors


def factors_digest(factors: dict[str, tuple]) -> str:
    """A digest of the factors' values, to check that both processes made the same LoRA."""
    digest = hashlib.sha256()
    for path in sorted(factors):
        digest.update(path.encode())
        for array in factors[path]:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def lora_job(config: dict, batch: int, size: int, rank: int, alpha: float, strength: float, repeats: int,
             seed: int, sgemm_n: int) -> dict:
    """diffusers' UNet (float32, :func:`seeded_unet_forward`) with :func:`lora_factors` through
    PEFT: attach (``load_lora_adapter``, checked to have wrapped every layer at alpha / rank),
    then per repeat: no LoRA, live, fuse, fused, unfuse; medians, the first fuse apart."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    reference, forward = seeded_unet_forward(config, batch, size, "float32", seed)
    factors = lora_factors(reference, rank, alpha, strength)
    forward()  # warm-up
    state = {}
    for path, (down, up) in factors.items():
        state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = torch.from_numpy(down), torch.from_numpy(up)
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(factors)}
    r = {"attach_s": _seconds(lambda: reference.load_lora_adapter(state, prefix=None, metadata=metadata))}
    wrapped = [m for m in reference.modules() if isinstance(m, BaseTunerLayer)]
    scalings = {s for m in wrapped for s in m.scaling.values()}
    if len(wrapped) != len(factors) or scalings != {alpha / rank}:
        raise RuntimeError(f"PEFT wrapped {len(wrapped)} of {len(factors)} layers with scalings {scalings}")
    forward()  # warm-up, live
    times = {k: [] for k in ("base_s", "live_s", "fuse_s", "fused_s", "remove_s")}
    for _ in range(repeats):
        reference.disable_lora()
        times["base_s"].append(_seconds(forward))
        reference.enable_lora()
        times["live_s"].append(_seconds(forward))
        times["fuse_s"].append(_seconds(lambda: reference.fuse_lora(lora_scale=1.0)))
        times["fused_s"].append(_seconds(forward))
        times["remove_s"].append(_seconds(reference.unfuse_lora))
    r.update({k: statistics.median(v) for k, v in times.items()})
    r["first_fuse_s"] = times["fuse_s"][0]
    return r | {"factors": factors_digest(factors), "sgemm": torch_sgemm_gflops(sgemm_n)}


# ---------------------------------------------------------------------- the whole pipeline


def reset_peak_rss() -> None:
    """Linux keeps one RSS high-water mark per process; writing 5 to clear_refs resets it, so
    that each stage's peak is its own."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Stages:
    """Seconds and peak RSS of a run's stages, each measured from the end of the one before."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.rss: dict[str, float] = {}
        self._stage, self._start = None, 0.0

    def begin(self, stage: str) -> None:
        self.end()
        self._stage, self._start = stage, time.perf_counter()
        reset_peak_rss()

    def end(self) -> None:
        if self._stage is not None:
            self.seconds[self._stage] = time.perf_counter() - self._start
            self.rss[self._stage] = peak_rss_gib()
        self._stage = None


def pipeline_job(folder: str, latents: str, steps: int, guidance: float, prompt: str, image: str,
                 tile_vae: bool, tiny_vae: str | None) -> dict:
    """diffusers' StableDiffusionXLPipeline from ``folder`` (float32, as saved) on the latents in
    the .npy file ``latents`` (NHWC), the image written to the .npy file ``image``. Per stage
    (load, text encoders, denoising, VAE decode; the tiny VAE's decode of the same latents when
    ``tiny_vae`` names an AutoencoderTiny folder, its image written to ``image`` + ".tiny.npy"):
    seconds and peak RSS; "step" is the median step."""
    import torch
    from diffusers import AutoencoderTiny, StableDiffusionXLPipeline

    stages, stamps = Stages(), []
    stages.begin("load")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if tile_vae:
        pipe.vae.enable_tiling()
    encode_prompt, decode = pipe.encode_prompt, pipe.vae.decode
    final = {}

    def timed_encode(*args, **kwargs):  # (an instance attribute shadows the method the pipeline calls)
        stages.begin("text encoders")
        out = encode_prompt(*args, **kwargs)
        stages.begin("denoising")
        stamps.append(time.perf_counter())
        return out

    def timed_decode(z, *args, **kwargs):
        stages.begin("VAE decode")
        final["latents"] = z * pipe.vae.config.scaling_factor  # (the pipeline's latents, as a tiny VAE takes them)
        return decode(z, *args, **kwargs)

    pipe.encode_prompt, pipe.vae.decode = timed_encode, timed_decode
    z = torch.from_numpy(np.load(latents)).permute(0, 3, 1, 2)
    start = time.perf_counter()
    with torch.no_grad():
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=z.shape[2] * 8,
                   width=z.shape[3] * 8, latents=z, output_type="np",
                   callback_on_step_end=lambda *a: stamps.append(time.perf_counter()) or {}).images
    stages.end()
    total = time.perf_counter() - start
    np.save(image, out)
    # A step is the time from the previous one's end (from the start of denoising for the first).
    step = statistics.median(np.diff(stamps).tolist())
    result = {"seconds": {**stages.seconds, "step": step, "total": total}, "rss": stages.rss}
    if tiny_vae:
        del pipe
        tiny = AutoencoderTiny.from_pretrained(tiny_vae).eval()
        stages.begin("tiny VAE decode")
        with torch.no_grad():
            pixels = tiny.decode(final["latents"] / tiny.config.scaling_factor).sample
        stages.end()
        # The pipeline's postprocessing of an image in [-1, 1], NHWC.
        np.save(image + ".tiny.npy", (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy())
        result["seconds"]["tiny VAE decode"] = stages.seconds["tiny VAE decode"]
        result["rss"]["tiny VAE decode"] = stages.rss["tiny VAE decode"]
    return result


JOBS = {"unet": unet_job, "attention": attention_job, "lora": lora_job, "pipeline": pipeline_job}


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
