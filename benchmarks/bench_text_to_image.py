"""Prompt to image, ours (SDXLPipeline) against diffusers' StableDiffusionXLPipeline, stage by stage.

    python benchmarks/bench_text_to_image.py                          # SDXL base sizes, 512 px, 4 steps, float32
    python benchmarks/bench_text_to_image.py --size 512 1024 --dtype float32 float16 --workdir ~/sdxl-random
    python benchmarks/bench_text_to_image.py --quick                  # tiny components: checks the benchmark runs

The pipeline has SDXL base's architecture with seeded random weights (no download): built in
diffusers, saved to the work dir, converted there by our converter, so both sides hold the same
weights; likewise a random tiny VAE (TAESDXL's architecture). Both get the same prompt, initial
latents, steps, guidance (so a batch of two through the UNet) and thread count. diffusers runs
in a process of its own (``torch_reference.py`` says why), in float32 whatever --dtype (ours) is.
Per stage (load, text encoders, denoising, VAE decode, and the tiny VAE's decode of the same final
latents): seconds of ours, of diffusers, and ours/diffusers ("step" is the median denoising step),
then the peak memory of each stage: MLX's (ours) and the process's RSS (both sides). Ours runs as
a one-shot ``mlx-unet generate`` does: the UNet released before the decode, and a float16 UNet
held in float32 while it denoises where the run is long enough to pay (--widen-weights). A
full-size run needs about 20 GB of memory and, without --workdir, 30 GB of temporary disk.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import gzip
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import torch_reference  # noqa: E402  (benchmarks/, on sys.path when run as a script)
from torch_reference import random_module  # noqa: E402
import mlx_unet  # noqa: E402  (before mlx: the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mlx_unet import AutoencoderTiny, CLIPTextConfig, SDXLPipeline, TinyVAEConfig, UNetConfig, VAEConfig  # noqa: E402
from mlx_unet.convert import convert  # noqa: E402
from mlx_unet.pipelines.pixels import decode as decode_images  # noqa: E402
from mlx_unet.pipelines.run import WIDEN_FROM_FORWARDS  # noqa: E402
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, 35mm"
GUIDANCE = 5.0
WIDENING = {"auto": None, "yes": True, "no": False}  # --widen-weights: the pipeline's widen_weights
# "UNet load": ours loads the UNet when the call first needs it, after the prompt is encoded; its
# seconds count in "load" (and not in "total"), as diffusers' loading of every part does.
STAGES = ("load", "UNet load", "text encoders", "denoising", "step", "VAE decode", "total", "tiny VAE decode")


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


def build_diffusers_pipeline(folder: Path, quick: bool, configs: tuple | None = None) -> None:
    """``configs``: (UNet, CLIP ViT-L, OpenCLIP bigG, VAE) configs in place of the presets."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFTextConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if configs is not None:
        unet, clip_l, bigg, vae = configs
    elif quick:  # the tiny presets, the UNet widened to take the two tiny encoders' 48 + 40 states
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


def build_tiny_vae(folder: Path, quick: bool) -> None:
    """A random tiny VAE: TAESD's architecture (TAESDXL's is the same), or the tiny preset."""
    from diffusers import AutoencoderTiny as TorchTinyVAE

    config = TinyVAEConfig.from_preset("tiny" if quick else "taesd").to_diffusers_dict()
    tiny = random_module(TorchTinyVAE, **{k: v for k, v in config.items() if not k.startswith("_")}, seed=4)
    tiny.save_pretrained(folder)


# ---------------------------------------------------------------------- measuring


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def release_memory() -> None:
    """Give freed memory back to the OS between stages: MLX's buffer cache and glibc's heap keep
    it otherwise, and the next stage's RSS would count it."""
    gc.collect()
    mx.clear_cache()
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)



class Stages(torch_reference.Stages):
    """The reference's stage clock, with MLX's peak memory of each stage too."""

    def __init__(self):
        super().__init__()
        self.mlx: dict[str, float] = {}

    def begin(self, stage: str) -> None:
        super().begin(stage)
        mx.reset_peak_memory()

    def end(self) -> None:
        if self._stage is not None:
            self.mlx[self._stage] = mx.get_peak_memory() / 2**30
        super().end()


def run_ours(folder: Path, tiny_folder: Path, latents: np.ndarray, steps: int, dtype: str, tile_vae: bool,
             widen_weights: bool | None) -> dict:
    stages, stamps = Stages(), []
    stages.begin("load")
    pipe = SDXLPipeline.from_pretrained(folder, dtype=getattr(mx, dtype))
    pipe._text_encoders()  # loaded now, as diffusers' are: the stage is the encoding, not the reading
    if tile_vae:
        pipe.vae.enable_tiling()
    encode_prompt, decode = pipe.encode_prompt, pipe.decode

    def timed_encode(*args, **kwargs):  # (it then releases the encoders)
        stages.begin("text encoders")
        out = encode_prompt(*args, **kwargs)
        stages.begin("UNet load")
        pipe.unet  # loaded now, as the call would load it: timed apart from the steps
        stages.begin("denoising")
        stamps.append(time.perf_counter())
        return out

    def timed_decode(x, *args, **kwargs):
        stages.begin("VAE decode")
        final.append(x)
        return decode(x, *args, **kwargs)

    final = []
    pipe.encode_prompt, pipe.decode = timed_encode, timed_decode
    start = time.perf_counter()
    image = pipe(PROMPT, steps=steps, guidance=GUIDANCE, latents=mx.array(latents), output="float", release_unet=True,
                 widen_weights=widen_weights, callback=lambda stage, step: stamps.append(time.perf_counter()))
    stages.end()
    total = time.perf_counter() - start
    pipe = None  # freed before the tiny VAE decode (its closures still name it)
    tiny = AutoencoderTiny.from_pretrained(tiny_folder, dtype=getattr(mx, dtype))
    release_memory()
    stages.begin("tiny VAE decode")
    tiny_image = decode_images(tiny, final[0], as_uint8=False)
    stages.end()
    seconds = {**stages.seconds, "step": statistics.median(np.diff(stamps).tolist())}
    seconds |= {"load": seconds["load"] + seconds["UNet load"], "total": total - seconds["UNet load"]}
    return {"seconds": seconds, "rss": stages.rss, "mlx": stages.mlx, "image": image, "tiny image": tiny_image}


# ---------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", help="image heights and widths in pixels (default: 512; 64 with --quick)")
    p.add_argument("--steps", type=int, help="denoising steps (default: 4; 2 with --quick)")
    p.add_argument("--dtype", nargs="+", choices=["float32", "float16"], default=["float32"],
                   help="ours (diffusers: float32)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both sides (default: all cores)")
    p.add_argument("--tile-vae", action="store_true", help="both sides decode in tiles")
    p.add_argument("--widen-weights", choices=WIDENING, default="auto",
                   help="ours in float16: the UNet held in float32 while it denoises (auto, the default: as mlx-unet "
                        f"generate, in runs of {WIDEN_FROM_FORWARDS} steps or more where that fits)")
    p.add_argument("--no-diffusers", action="store_true", help="run ours only")
    p.add_argument("--workdir", type=Path, help="keep the random pipeline here between runs (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny components: a smoke run")
    args = p.parse_args(argv)
    sizes = args.size or [64 if args.quick else 512]
    steps = args.steps if args.steps is not None else 2 if args.quick else 4
    if any(size % 32 for size in sizes) or steps < 2:
        p.error("--size must be a multiple of 32 and --steps at least 2 (a median step)")

    import diffusers
    import transformers

    for library in (diffusers, transformers):  # no progress bars or load warnings between the results
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    os.environ.setdefault("MLX_ENABLE_TF32", "0")
    mlx_unet.cpu.blas.set_threads(args.threads)  # MLX's matmuls run in OpenBLAS's threads

    temp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-t2i-")
    workdir = (args.workdir or Path(temp.name)).expanduser()
    kind = "tiny" if args.quick else "sdxl-base"
    reference, tiny_reference = workdir / f"{kind}-diffusers", workdir / f"{kind}-tiny-vae-diffusers"
    if not (reference / "model_index.json").is_file():
        print(f"building a random {kind} pipeline in {reference}", flush=True)
        build_diffusers_pipeline(reference, args.quick)
    if not (tiny_reference / "config.json").is_file():
        build_tiny_vae(tiny_reference, args.quick)
    release_memory()
    tiny_folder = workdir / f"{kind}-tiny-vae-mlx"
    if not (tiny_folder / "config.json").is_file():
        convert(tiny_reference, tiny_folder, dtype="float32", progress=False)
    for dtype in args.dtype:
        if not (workdir / f"{kind}-mlx-{dtype}" / "model_index.json").is_file():
            print(f"converting it to {workdir / f'{kind}-mlx-{dtype}'}", flush=True)
            convert(reference, workdir / f"{kind}-mlx-{dtype}", dtype=dtype, progress=False)

    blas = mlx_unet.cpu.blas.loaded or "MLX's bundled BLAS"
    print(f"{kind}, {steps} steps, guidance {GUIDANCE}; MLX {mx.__version__} ({mx.default_device()}, {blas}); "
          f"diffusers {diffusers.__version__} float32 (torch {torch.__version__}, CPU) in its own process; "
          f"{args.threads} threads{'; tiled VAE' if args.tile_vae else ''}; float16 widened: {args.widen_weights}")
    for size in sizes:
        latents = np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 4), dtype=np.float32)
        theirs = None
        if not args.no_diffusers:
            np.save(workdir / "latents.npy", latents)
            theirs = torch_reference.run("pipeline", args.threads, folder=str(reference),
                                         latents=str(workdir / "latents.npy"), steps=steps, guidance=GUIDANCE,
                                         prompt=PROMPT, image=str(workdir / "image.npy"), tile_vae=args.tile_vae,
                                         tiny_vae=str(tiny_reference))
            theirs["image"] = np.load(workdir / "image.npy")
            theirs["tiny image"] = np.load(workdir / "image.npy.tiny.npy")
        for dtype in args.dtype:
            release_memory()
            ours = run_ours(workdir / f"{kind}-mlx-{dtype}", tiny_folder, latents, steps, dtype, args.tile_vae,
                            WIDENING[args.widen_weights])
            print_table(size, dtype, ours, theirs)
    if temp:
        temp.cleanup()
    return 0


def print_table(size: int, dtype: str, ours: dict, theirs: dict | None) -> None:
    print(f"\n{size}x{size} px, ours {dtype}")
    print(f"{'stage':<16} {'ours s':>8} {'diffusers s':>11} {'ratio':>6} {'ours MLX GiB':>12} {'ours RSS GiB':>12} "
          f"{'diffusers RSS GiB':>17}")
    for stage in STAGES:
        seconds = ours["seconds"][stage]
        other = f"{theirs['seconds'][stage]:11.2f} {seconds / theirs['seconds'][stage]:6.2f}" \
            if theirs and stage in theirs["seconds"] else f"{'-':>11} {'-':>6}"
        memory = f"{ours['mlx'][stage]:12.2f} {ours['rss'][stage]:12.2f}" if stage in ours["mlx"] else f"{'':>12} {'':>12}"
        their_rss = f"{theirs['rss'][stage]:17.2f}" if theirs and stage in theirs["rss"] else ""
        print(f"{stage:<16} {seconds:8.2f} {other} {memory} {their_rss}".rstrip())
    # The whole run's peaks: the tiny VAE's decode is an alternative to the VAE's, not a stage of it.
    run_stages = [stage for stage in ours["mlx"] if stage != "tiny VAE decode"]
    their_peak = f"{max(theirs['rss'].get(s, 0) for s in run_stages):17.2f}" if theirs else f"{'-':>17}"
    print(f"{'peak (run)':<16} {'':>8} {'':>11} {'':>6} {max(ours['mlx'][s] for s in run_stages):12.2f} "
          f"{max(ours['rss'][s] for s in run_stages):12.2f} {their_peak}")
    if theirs:
        for name in ("image", "tiny image"):
            difference = float(np.abs(ours[name].astype(np.float64) - theirs[name]).max())
            print(f"{name} max abs difference: {difference:.2e} (images in [0, 1])")


if __name__ == "__main__":
    sys.exit(main())
