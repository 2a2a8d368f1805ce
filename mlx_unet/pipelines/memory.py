"""How much memory a run needs, estimated from the configs before anything is allocated, and
whether this process can get that much.

A run's peak is the largest of its stages, each the weights resident at that point plus that
stage's working memory (see ``sdxl.py``: the UNet and the VAE are loaded with the pipeline, the
text encoders only for the prompt; a refiner pipeline holds its own UNet and VAE from its load):

- "text encoders": the encoders' weights and their (small) activations;
- "denoise" / "refine": one UNet forward's activations, for the whole guided batch, or for one
  sample at a time under ``low_memory`` (``Sampler._predict``);
- "decode": the VAE decoder's activations at the full image size, or at one tile's size when it
  decodes in tiles (of ``vae_tile`` pixels with ``vae.enable_tiling()``; by need, the default,
  of the size ``decode_tile`` picks, as ``AutoencoderKL.decode`` does), plus the decoded images.

Activations are counted per layer shape from the configs and scaled by factors measured on
real runs (``benchmarks/bench_memory_estimate.py`` prints measured against estimated), so that
the estimate bounds MLX's peak from above without being loose where activations dominate.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..configs.clip import CLIPTextConfig
from ..configs.quantization import Quantization
from ..configs.unet import UNetConfig
from ..configs.vae import VAEConfig
from ..cpu import computes_in, kernels_enabled
from ..cpu.attention import chunk_rows
from ..cpu.widen import widening_bytes
from ..errors import InputError
from ..models.unet import UNet2DConditionModel
from ..models.vae import tile_sizes
from .arguments import PIXELS_PER_LATENT
from .model_sizes import (largest_linear, text_embedding_parameters, text_encoder_bytes, unet_bytes,
                          vae_parameters)

BUDGET_ENV = "MLX_UNET_MEMORY_BUDGET_GB"
GIB = 2**30
F32 = 4  # bytes: GroupNorm statistics, the CPU kernels' products and the softmax run in float32
TOKENS = 77  # CLIP's context

# Working memory of a layer, in float32 copies of its largest activation, by code path (CPU
# kernels, plain MLX), measured with benchmarks/bench_memory_estimate.py on the CPU: the SDXL
# VAE decoder at 256 px took 10.4 copies with the kernels and 32 on the plain path (MLX's
# convolution first copies every 3x3 patch, 9x its input); the tiny pipeline's 10 and 34.
RESNET_WORK = {True: 11.0, False: 36.0}  # GroupNorm's float32 copies, SiLU, convolution, sum
# The VAE decoder's, since the CPU kernels fuse GroupNorm with SiLU in bands of rows and fuse the
# upsampler with its convolution: SDXL's decoder at 256-1024 px took 5.2-6.6 copies with them.
VAE_DECODE_WORK = {True: 7.0, False: RESNET_WORK[False]}
UNET_FEED_FORWARD_WORK = 3.0  # of the feed-forward's 8x-wide GEGLU activation
TEXT_WORK = 8.0  # of a text encoder layer's MLP activation
# The CPU kernels' chunked attention with chunks of 2 MiB of scores: MLX runs several chunks of
# the lazy graph at once, each with its float32 temporaries (measured 65-91 MiB at 1024-4096
# tokens, 2-8 heads). Over 16384 tokens a chunk holds 128 query rows (8 MiB, ``cpu.attention``),
# and the peak grew in step (306-386 MiB, from 116-154): counted in proportion to the chunk.
CHUNKED_ATTENTION = 128 * 2**20
CHUNKED_ATTENTION_SCORES = 1 << 19  # the chunk that CHUNKED_ATTENTION was measured with
# What every stage holds besides weights and layer activations (latents, prompt embeddings,
# timesteps, the scheduler's tables, allocator rounding): the tiny pipeline's runs measured up to
# 1.3 MiB above the estimate without it.
STAGE_ALLOWANCE = 8 * 2**20
# The CPU kernels' quantized layers dequantize their weight to float32 at each call, and their
# half-precision ones widen it (``cpu.half.float32``), and MLX holds several of these at once: a
# whole 1024 px run at 4 bits (benchmarks/bench_quantize.py memory) peaked 0.36 GiB above the
# estimate without them, against 52 MiB for SDXL's largest Linear weight in float32. Counted in
# the text-encoder and denoising stages, as that run could not tell which of them peaked.
FLOAT32_WEIGHT_COPIES = 8

# What this process itself needs besides MLX's buffers: Python, the MLX and BLAS libraries and
# their threads. Measured after ``import mlx_unet`` and one product on this 2-core Linux machine:
# 39 MB resident, 0.55 GB of address space. Resident limits keep this allowance free; under an
# address-space limit what is mapped already is known (/proc/self/status) and this covers growth.
RESIDENT_HEADROOM = GIB // 2
ADDRESS_SPACE_HEADROOM = GIB // 4

# ---------------------------------------------------------------------- activations


def _attention(batch: int, heads: int, tokens: int, nbytes: int, chunked: bool) -> int:
    """Bytes of one self-attention's scores: the CPU kernels' chunks (``CHUNKED_ATTENTION``), or
    the whole (batch, heads, tokens, tokens) matrix, which MLX's CPU backend materialises in the
    inputs' dtype (measured). Metal's fused kernels need not, but not for every head width (the
    VAE's single 512-wide head): counted on the plain path everywhere, an upper bound there."""
    if chunked:
        return CHUNKED_ATTENTION * max(1, chunk_rows(tokens, tokens) * tokens // CHUNKED_ATTENTION_SCORES)
    return batch * heads * tokens * tokens * nbytes


def unet_activations(c: UNetConfig, latent: tuple[int, int], batch: int, dtype: mx.Dtype, chunked: bool) -> int:
    """One forward's working memory: the skips held for the up blocks, plus the largest layer's."""
    nbytes = mx.float32.size if c.upcast_attention else dtype.size
    h, w = latent
    skips = h * w * c.block_out_channels[0]  # conv_in's output
    largest = 0
    for level, kind in enumerate(c.down_block_types):
        pixels = math.ceil(h / 2**level) * math.ceil(w / 2**level)
        channels = c.block_out_channels[level]
        # The up block of this level concatenates a skip to its input: up to twice the width.
        largest = max(largest, batch * RESNET_WORK[chunked] * pixels * 2 * channels * F32)
        skips += pixels * channels * (c.layers_per_block[level] + (level < c.num_levels - 1))
        if kind == "CrossAttnDownBlock2D":
            feed_forward = batch * UNET_FEED_FORWARD_WORK * pixels * 8 * channels * F32
            scores = _attention(batch, c.num_attention_heads[level], pixels, nbytes, chunked)
            largest = max(largest, feed_forward + scores)
    return int(batch * skips * dtype.size + largest)


def vae_decode_activations(c: VAEConfig, pixels: tuple[int, int], batch: int, dtype: mx.Dtype, chunked: bool) -> int:
    """The decoder's working memory at ``pixels`` (height, width): the largest up level's output
    (the second-to-last level's channels after its upsampler, at the full size), and the mid
    block's one-head attention over every latent pixel."""
    f = c.downsample_factor
    h, w = math.ceil(pixels[0] / f), math.ceil(pixels[1] / f)
    up = tuple(reversed(c.block_out_channels))
    largest = max(up[i] * h * w * 4**min(i + 1, len(up) - 1) for i in range(len(up)))
    scores = _attention(batch, 1, h * w, dtype.size, chunked) if c.mid_block_add_attention else 0
    return int(batch * VAE_DECODE_WORK[chunked] * largest * F32 + scores)


def _images(batch: int, pixels: tuple[int, int], channels: int) -> int:
    """The decoded images: the VAE's output, its float32 copy, the [0, 1] array and the uint8 one."""
    return batch * pixels[0] * pixels[1] * channels * (3 * F32 + 1)


def decode_bytes(c: VAEConfig, pixels: tuple[int, int], tile: int | None, batch: int, dtype: mx.Dtype,
                 chunked: bool) -> int:
    """A decode's working memory: the decoder's activations at the size of one ``tile`` (None:
    the whole image), and the decoded images of ``pixels`` (height, width)."""
    decoded = pixels if tile is None else (min(pixels[0], tile), min(pixels[1], tile))
    return vae_decode_activations(c, decoded, batch, dtype, chunked) + _images(batch, pixels, c.out_channels)


def decode_tile(c: VAEConfig, pixels: tuple[int, int], batch: int, dtype: mx.Dtype, chunked: bool, budget: int,
                tiles: Sequence[int]) -> int | None:
    """The tile size (pixels) a decode of ``batch`` images of ``pixels`` uses when its working
    memory (``decode_bytes``) may take ``budget`` bytes: None (whole) when the whole decode fits,
    else the first of ``tiles`` (largest first) whose decode fits, else the last.
    ``AutoencoderKL.decode`` and ``estimate_run`` both choose by this."""
    for tile in (None, *tiles):
        if decode_bytes(c, pixels, tile, batch, dtype, chunked) <= budget:
            return tile
    return tiles[-1]


def decode_budget() -> int:
    """What a decode may use now by default: ``available_memory()`` less what MLX holds already."""
    return available_memory()[0] - mx.get_active_memory()


def text_activations(encoders: Sequence[CLIPTextConfig], images: int) -> int:
    batch = 2 * images  # the prompts and the negative prompts
    return int(max((TEXT_WORK * batch * TOKENS * e.intermediate_size * F32 for e in encoders), default=0))


# ---------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class RunEstimate:
    """Bytes at each stage of a run (weights resident then, plus that stage's work); ``peak``
    is the largest. ``height`` x ``width`` and ``images`` say what run it is for."""

    height: int
    width: int
    images: int
    stages: dict[str, int] = field(hash=False)

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def describe(self) -> str:
        """e.g. "about 310 GiB (decode 270 GiB, denoise 38 GiB)": the two largest stages."""
        top = sorted(self.stages.items(), key=lambda kv: -kv[1])[:2]
        return f"about {_gib(self.peak)} ({', '.join(f'{name} {_gib(b)}' for name, b in top)})"


def _gib(nbytes: float) -> str:
    value = nbytes / GIB
    return f"{value:.3g} GiB" if value < 100 else f"{value:.0f} GiB"


def estimate_run(unet: UNetConfig, vae: VAEConfig, encoders: Sequence[CLIPTextConfig], *, height: int, width: int,
                 images: int, guided: bool, dtype: mx.Dtype, vae_dtype: mx.Dtype, tiled_vae: bool | None,
                 low_memory: bool, cpu_kernels: bool | None = None, refiner: UNetConfig | None = None,
                 vae_tile: int | None = None, vae_overlap: float = 0.25, vae_memory_budget: int | None = None,
                 unet_quantization: Quantization | None = None, text_quantization: Quantization | None = None,
                 release_unet: bool = False, widen_weights: bool = False) -> RunEstimate:
    """The memory a run of ``images`` images of ``height`` x ``width`` pixels needs at each stage.
    ``cpu_kernels`` None: whether ``mlx_unet.cpu`` puts its kernels in here (chunked attention).
    ``unet_quantization`` / ``text_quantization``: how the UNets / text encoders are quantized.
    ``tiled_vae``: the VAE's ``use_tiling`` (True: tiles of ``vae_tile`` pixels, default the VAE's
    sample_size; None: tiles by need, as ``AutoencoderKL.decode`` chooses them with
    ``vae_memory_budget``, its ``memory_budget``, and ``vae_tile`` and ``vae_overlap`` as its largest
    tile; False: whole). ``release_unet``: each UNet is freed at the end of its stage (the base
    one before the refiner's runs, the refiner's before the decode). ``widen_weights``: on the
    CPU kernels a half-precision UNet is held in float32 while it denoises (``cpu.widen``)."""
    chunked = kernels_enabled(cpu_kernels)
    unets = [unet] + ([refiner] if refiner is not None else [])
    # Each pipeline (base, refiner) holds its UNet and VAE for as long as it lives.
    unets_held = sum(unet_bytes(u, dtype.size, unet_quantization) for u in unets)
    resident = unets_held + len(unets) * vae_parameters(vae) * vae_dtype.size
    text = sum(text_encoder_bytes(e, dtype.size, text_quantization) for e in encoders)
    if chunked and dtype.size == 2:  # the kernels hold a half-precision encoder's embeddings in float32
        text += sum(2 * text_embedding_parameters(e) for e in encoders)
    latent = (height // PIXELS_PER_LATENT, width // PIXELS_PER_LATENT)
    batch = 1 if low_memory else images * (2 if guided else 1)
    resident += STAGE_ALLOWANCE
    # The CPU kernels widen quantized and half-precision weights to float32 at each call.
    quantized = unet_quantization is not None or text_quantization is not None
    widened = FLOAT32_WEIGHT_COPIES * F32 * largest_linear(unet) if chunked and (quantized or dtype.size == 2) else 0
    stages = {"text encoders": resident + text + text_activations(encoders, images) + widened}
    for name, config in zip(("denoise", "refine"), unets):
        held = resident - (unet_bytes(unet, dtype.size, unet_quantization) if name == "refine" and release_unet else 0)
        copies = widened
        if widen_weights and chunked and dtype.size == 2:  # its half weights in float32, quantized layers as they are
            held += unet_bytes(config, F32, unet_quantization) - unet_bytes(config, dtype.size, unet_quantization)
            copies = widened if unet_quantization is not None else 0  # float32 weights are used as they are
        stages[name] = held + unet_activations(config, latent, batch, computes_in(dtype, chunked), chunked) + copies
    tile = vae.sample_size if vae_tile is None else vae_tile
    decode_resident = resident - unets_held if release_unet else resident
    if tiled_vae is None:
        # The decode's budget by default is what the process can get less what it holds then.
        budget = available_memory()[0] - decode_resident if vae_memory_budget is None else vae_memory_budget
        tiles = tile_sizes(tile, vae_overlap, vae.downsample_factor)
        tile = decode_tile(vae, (height, width), images, vae_dtype, chunked, budget, tiles)
    if tiled_vae is False:
        tile = None
    stages["decode"] = decode_resident + decode_bytes(vae, (height, width), tile, images, vae_dtype, chunked)
    return RunEstimate(height, width, images, stages)


# ---------------------------------------------------------------------- what this process can get


def _cgroup_limit() -> tuple[int, str] | None:
    """The memory limit of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        name = "memory.max" if controllers == "" else "memory.limit_in_bytes" if "memory" in controllers.split(",") else None
        if name is None:
            continue
        root = Path("/sys/fs/cgroup") if controllers == "" else Path("/sys/fs/cgroup/memory")
        for folder in (root / path.lstrip("/"), root):  # inside a container the path may not be mounted
            try:
                value = (folder / name).read_text().strip()
            except OSError:
                continue
            if value.isdigit():
                return int(value), f"cgroup {name}"
            break  # "max": unlimited
    return None


def _unavailable(field_name: str) -> int:
    """Address space this process has mapped that the estimate does not count: all it has mapped
    (``field_name`` of /proc/self/status) less MLX's buffers, which hold the weights the estimate
    counts. Where /proc is absent (macOS), ``RESIDENT_HEADROOM`` stands in for it."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return RESIDENT_HEADROOM
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith(field_name + ":")), None)
    return RESIDENT_HEADROOM if kib is None else max(kib * 1024 - mx.get_active_memory(), 0)


def _limits() -> list[tuple[int, str]]:
    """(usable bytes, what limits it), one entry per limit that applies."""
    limits = [(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") - RESIDENT_HEADROOM, "physical memory")]
    if mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        # Past the recommended working set, Metal pages the GPU's buffers out: the practical limit.
        size = info.get("max_recommended_working_set_size", info.get("memory_size"))
        if size:
            limits.append((int(size) - RESIDENT_HEADROOM, "Metal's recommended working set"))
    for kind, name, mapped in ((resource.RLIMIT_AS, "RLIMIT_AS", "VmSize"),
                               (getattr(resource, "RLIMIT_DATA", None), "RLIMIT_DATA", "VmData")):
        soft = resource.RLIM_INFINITY if kind is None else resource.getrlimit(kind)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append((soft - _unavailable(mapped) - ADDRESS_SPACE_HEADROOM, f"the address-space limit ({name})"))
    cgroup = _cgroup_limit()
    if cgroup is not None:
        limits.append((cgroup[0] - RESIDENT_HEADROOM, cgroup[1]))
    return limits


def available_memory() -> tuple[int, str]:
    """The bytes a run may use here and what sets that: ``MLX_UNET_MEMORY_BUDGET_GB`` (GiB) when
    set, else the smallest of the limits that apply, less what the process itself needs."""
    budget = os.environ.get(BUDGET_ENV)
    if budget:
        try:
            value = float(budget)
        except ValueError:
            value = -1.0
        if not value > 0 or not math.isfinite(value):
            raise InputError(f"{BUDGET_ENV} must be a positive number of GiB, got {budget!r}.")
        return int(value * GIB), BUDGET_ENV
    usable, what = min(_limits())
    return max(usable, 0), what


def widening_fits(unet: UNet2DConditionModel, sample: tuple[int, ...]) -> bool:
    """Whether ``unet``'s half weights held in float32 for a run (``cpu.widen``) leave that run
    within ``available_memory()``: what MLX holds now, plus the float32 copies, plus a forward
    of ``sample``'s shape (B, h, w, C)."""
    batch, height, width = sample[:3]
    forward = unet_activations(unet.config, (height, width), batch, mx.float32, True)
    return mx.get_active_memory() + widening_bytes(unet) + forward + STAGE_ALLOWANCE <= available_memory()[0]


# --tile-vae's tiles: at most 256 px. The VAE's sample_size, diffusers' default tile (and
# vae.enable_tiling()'s), is 1024 px for SDXL, which leaves a 1024 px image in one tile; in 512 px
# tiles a 1024 px decode still peaked at 2.6 GiB above the models (float32 VAE, CPU kernels),
# the whole run's largest stage (benchmarks/bench_quantize.py memory); in 256 px tiles it is
# below the denoising's.
COMMAND_TILE = 256


def command_tile(vae: VAEConfig) -> int:
    """The tile size ``--tile-vae`` decodes in, in pixels."""
    return min(vae.sample_size, COMMAND_TILE)


def check_run_fits(unet: UNetConfig, vae: VAEConfig, encoders: Sequence[CLIPTextConfig], **run) -> RunEstimate:
    """``estimate_run``'s estimate; InputError when it is more than ``available_memory()``, with
    what would fit instead."""
    estimate = estimate_run(unet, vae, encoders, **run)
    budget, what = available_memory()
    if estimate.peak <= budget:
        return estimate
    limit = f"the {_gib(budget)} this machine has" if what == "physical memory" else f"the {_gib(budget)} {what} allows"
    raise InputError(f"a {estimate.width}x{estimate.height} image{'s' * (estimate.images > 1)} "
                     f"{'x' + str(estimate.images) + ' ' if estimate.images > 1 else ''}needs {estimate.describe()}, "
                     f"more than {limit}; {_suggestions(unet, vae, encoders, run, budget)}.")


def _suggestions(unet, vae, encoders, run: dict, budget: int) -> str:
    def fits(**change) -> bool:
        return estimate_run(unet, vae, encoders, **(run | change)).peak <= budget

    ways = []
    tiled = dict(tiled_vae=True, vae_tile=command_tile(vae))
    if not run["tiled_vae"] and fits(**tiled):
        ways.append("decode in tiles (--tile-vae, vae.enable_tiling())")
    if not run["low_memory"] and fits(low_memory=True):
        ways.append("use --low-memory (low_memory=True)")
    elif not run["low_memory"] and not run["tiled_vae"] and not ways and fits(low_memory=True, **tiled):
        ways.append("decode in tiles and use low memory (--tile-vae --low-memory; vae.enable_tiling(), low_memory=True)")
    side = _largest_square(fits, max(run["height"], run["width"]))
    if side:
        ways.append(f"make it smaller (at most about {side}x{side} fits, --height/--width)")
    if run["images"] > 1 and fits(images=1):
        most = max(n for n in range(1, run["images"]) if fits(images=n))
        ways.append(f"make fewer images at once (at most {most})")
    if not ways:
        return "not even the smallest image fits: free memory, or use a smaller --dtype (dtype=) for the models"
    return ", ".join(ways[:-1]) + (" or " if len(ways) > 1 else "") + ways[-1]


def _largest_square(fits, below: int) -> int | None:
    """The largest side (a multiple of 8 pixels, under ``below``) whose square image fits."""
    low, high = 0, below // PIXELS_PER_LATENT  # in latent pixels; fits at low (or low is 0), not at high
    while high - low > 1:
        middle = (low + high) // 2
        side = middle * PIXELS_PER_LATENT
        low, high = (middle, high) if fits(height=side, width=side) else (low, middle)
    return low * PIXELS_PER_LATENT or None
