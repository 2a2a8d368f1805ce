"""Prompt to image, ours (SDXLPipeline) against diffusers' StableDiffusionXLPipeline, in one process.

    python benchmarks/bench_text_to_image.py                          # SDXL base sizes, 512 px, 4 steps, float32
    python benchmarks/bench_text_to_image.py --size 1024 --dtype float16 --workdir ~/sdxl-random
    python benchmarks/bench_text_to_image.py --quick                  # tiny components: checks the benchmark runs

The pipeline has SDXL base's architecture with seeded random weights (no download): built in
diffusers, saved to the work dir, converted there by our converter, so both sides hold the same
weights. Both get the same prompt, initial latents, steps, guidance (so a batch of two through the
UNet) and thread count. diffusers runs on the CPU in float32 whatever --dtype (ours) is.
Per stage: seconds of ours, of diffusers, and ours/diffusers; "denoising" is the median step.
Loading is not timed; both sides have their text encoders loaded before the run. Peak memory: MLX's
(ours) and the process's peak RSS during each side's load and run. diffusers runs first and is
freed before ours loads: two float32 SDXLs do not fit in 24 GB together. A full-size run needs
about 20 GB of memory and, without --workdir, 30 GB of temporary disk.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import gzip
import importlib.util
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import mlx_unet  # noqa: E402  (before mlx: the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mlx_unet import SDXLPipeline, UNetConfig, VAEConfig  # noqa: E402
from mlx_unet.convert import convert  # noqa: E402
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG  # noqa: E402
from mlx_unet import CLIPTextConfig  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, 35mm"
GUIDANCE = 5.0
STAGES = ("text encoders", "denoising s/step", "VAE decode", "total")


# ---------------------------------------------------------------------- the random pipeline


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's real vocabulary and merges, built as CLIP does from the BPE file the openai-clip
    package ships (no Hub access): 256 byte symbols, the same with </w>, 48894 merges, 2 specials."""
    spec = importlib.util.find_spec("clip")  # located, not imported (that needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the openai-clip package is needed for CLIP's vocabulary: pip install -e '.[test]'")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1: 1 + 49408 - 512 - 2]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in merges]


def random_module(cls, *args, seed: int, **kwargs) -> torch.nn.Module:
    """``cls(*args, **kwargs)`` allocated once (on the meta device first, so no default init runs)
    with every parameter drawn uniformly from ``seed``: norm scales around 1 and shifts around 0, not
    exactly 1 and 0, and weights scaled for unit-variance outputs."""
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


def build_diffusers_pipeline(folder: Path, quick: bool) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFTextConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if quick:  # the tiny presets, the UNet widened to take the two tiny encoders' 48 + 40 states
        unet = UNetConfig.from_preset("tiny", cross_attention_dim=88, projection_class_embeddings_input_dim=24 + 6 * 8)
        clip_l, bigg = CLIPTextConfig.from_preset("tiny-clip-l"), CLIPTextConfig.from_preset("tiny-clip-bigg")
        vae = VAEConfig.from_preset("tiny")
    else:
        unet = UNetConfig.from_preset("sdxl-base")
        clip_l, bigg = CLIPTextConfig.from_preset("sdxl-clip-l"), CLIPTextConfig.from_preset("sdxl-clip-bigg")
        vae = VAEConfig.from_preset("sdxl")
    vocab, merges = clip_vocabulary()
    tokenizers = [CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)
                  for pad in ("<|endoftext|>", "!")]  # SDXL's two tokenizers differ in padding only
    pipe = StableDiffusionXLPipeline(
        unet=random_module(UNet2DConditionModel, **unet.to_diffusers_dict(), seed=0),
        text_encoder=random_module(CLIPTextModel, HFTextConfig(**clip_l.to_transformers_dict()), seed=1),
        text_encoder_2=random_module(CLIPTextModelWithProjection, HFTextConfig(**bigg.to_transformers_dict()), seed=2),
        vae=random_module(AutoencoderKL, **vae.to_diffusers_dict(), seed=3),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG))
    # Random decoder weights give pixels far outside [-1, 1]; a smaller output conv keeps most of
    # them unclamped, so that the image difference compares values, not saturated pixels.
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(0.5)
        pipe.vae.decoder.conv_out.bias.mul_(0.2)
    # Small shards: saving copies a shard's bytes, and diffusers (without accelerate) loads shard by shard.
    pipe.save_pretrained(folder, max_shard_size="2GB")


# ---------------------------------------------------------------------- measuring


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def release_memory() -> None:
    """Give freed memory back to the OS between the sides: torch frees into glibc's heap, which
    keeps it unless trimmed, and ours would land on top of it."""
    gc.collect()
    mx.clear_cache()
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Linux keeps one RSS high-water mark per process; writing 5 to clear_refs resets it, so that
    each side's peak is its own and not the earlier side's or the pipeline build's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn, spans: dict, name: str):
    """``fn`` that records the (start, end) of its last call in ``spans[name]``."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        spans[name] = (start, time.perf_counter())
        return out
    return wrapper


def result(spans: dict, steps: list[float], start: float, end: float, image: np.ndarray) -> dict:
    return {"text encoders": spans["text"][1] - spans["text"][0], "denoising s/step": statistics.median(steps),
            "VAE decode": spans["decode"][1] - spans["decode"][0], "total": end - start,
            "rss": peak_rss_gib(), "image": image}


def run_diffusers(folder: Path, latents: np.ndarray, steps: int, tile_vae: bool) -> dict:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)  # float32, as saved
    pipe.set_progress_bar_config(disable=True)
    if tile_vae:
        pipe.vae.enable_tiling()
    # Instance attributes shadow the methods the pipeline calls, so one ordinary call times each stage.
    spans, stamps = {}, []
    pipe.encode_prompt = timed(pipe.encode_prompt, spans, "text")
    pipe.vae.decode = timed(pipe.vae.decode, spans, "decode")
    start = time.perf_counter()
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=latents.shape[1] * 8,
                 width=latents.shape[2] * 8, latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
                 output_type="np", callback_on_step_end=lambda *a: stamps.append(time.perf_counter()) or {}).images
    end = time.perf_counter()
    # A step is the time from the previous one's end (from the prompt's encoding for the first).
    return result(spans, np.diff([spans["text"][1]] + stamps).tolist(), start, end, image)


def run_ours(folder: Path, latents: np.ndarray, steps: int, dtype: str, tile_vae: bool) -> dict:
    pipe = SDXLPipeline.from_pretrained(folder, dtype=getattr(mx, dtype))
    pipe._text_encoders()  # loaded now, as diffusers' are: the stage is the encoding, not the reading
    if tile_vae:
        pipe.vae.enable_tiling()
    spans, step_seconds = {}, []
    pipe.encode_prompt = timed(pipe.encode_prompt, spans, "text")  # (it then releases the encoders)
    pipe.decode = timed(pipe.decode, spans, "decode")
    start = time.perf_counter()
    image = pipe(PROMPT, steps=steps, guidance=GUIDANCE, latents=mx.array(latents), output="float",
                 callback=lambda stage, step: step_seconds.append(step.seconds))
    end = time.perf_counter()
    return {**result(spans, step_seconds, start, end, image), "mlx": mx.get_peak_memory() / 2**30}


# ---------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, help="image height and width in pixels (default: 512; 64 with --quick)")
    p.add_argument("--steps", type=int, help="denoising steps (default: 4; 2 with --quick)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="ours (diffusers: float32)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both sides (default: all cores)")
    p.add_argument("--tile-vae", action="store_true", help="both sides decode in tiles")
    p.add_argument("--no-diffusers", action="store_true", help="run ours only")
    p.add_argument("--workdir", type=Path, help="keep the random pipeline here between runs (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny components: a smoke run")
    args = p.parse_args(argv)
    size = args.size or (64 if args.quick else 512)
    steps = args.steps if args.steps is not None else 2 if args.quick else 4
    if size % 32 or steps < 1:
        p.error("--size must be a multiple of 32 and --steps at least 1")

    import diffusers
    import transformers

    for library in (diffusers, transformers):  # no progress bars or load warnings between the results
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    os.environ.setdefault("MLX_ENABLE_TF32", "0")
    torch.set_num_threads(args.threads)
    if mlx_unet.cpu.blas.loaded:  # MLX's matmuls run in OpenBLAS's threads
        ctypes.CDLL(mlx_unet.cpu.blas.loaded).openblas_set_num_threads(args.threads)

    temp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-t2i-")
    workdir = (args.workdir or Path(temp.name)).expanduser()
    kind = "tiny" if args.quick else "sdxl-base"
    reference, ours_folder = workdir / f"{kind}-diffusers", workdir / f"{kind}-mlx-{args.dtype}"
    if not (reference / "model_index.json").is_file():
        print(f"building a random {kind} pipeline in {reference}", flush=True)
        build_diffusers_pipeline(reference, args.quick)
        release_memory()
    if not (ours_folder / "model_index.json").is_file():
        print(f"converting it to {ours_folder}", flush=True)
        convert(reference, ours_folder, dtype=args.dtype, progress=False)

    latents = np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 4), dtype=np.float32)
    reset_ok = reset_peak_rss()
    theirs = None
    if not args.no_diffusers:
        with torch.no_grad():
            theirs = run_diffusers(reference, latents, steps, args.tile_vae)
        release_memory()  # (collects the pipeline: the timing wrappers make it a reference cycle)
        reset_ok = reset_peak_rss() and reset_ok
    mx.reset_peak_memory()
    ours = run_ours(ours_folder, latents, steps, args.dtype, args.tile_vae)

    blas = mlx_unet.cpu.blas.loaded or "MLX's bundled BLAS"
    print(f"{kind}, {size}x{size} px, {steps} steps, guidance {GUIDANCE}; ours {args.dtype} (MLX {mx.__version__}, "
          f"{mx.default_device()}, {blas}), diffusers {diffusers.__version__} float32 (torch {torch.__version__}, CPU); "
          f"{args.threads} threads{'; tiled VAE' if args.tile_vae else ''}")
    print(f"{'stage':<18} {'ours s':>9} {'diffusers s':>11} {'ratio':>6}")
    for stage in STAGES:
        other = f"{theirs[stage]:11.3f} {ours[stage] / theirs[stage]:6.2f}" if theirs else f"{'-':>11} {'-':>6}"
        print(f"{stage:<18} {ours[stage]:9.3f} {other}")
    print(f"{'peak MLX GiB':<18} {ours['mlx']:9.2f} {'-':>11}")
    their_rss = f"{theirs['rss']:11.2f}" if theirs else f"{'-':>11}"
    print(f"{'peak RSS GiB':<18} {ours['rss']:9.2f} {their_rss}"
          + ("" if reset_ok else "  (not reset between sides: a peak includes what ran before)"))
    if theirs:
        difference = float(np.abs(ours["image"].astype(np.float64) - theirs["image"]).max())
        print(f"image max abs difference: {difference:.2e} (images in [0, 1])")
    if temp:
        temp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
