"""``mlx-unet generate``: images from prompts (and from images, with masks), each written as a PNG
that records what made it; ``generate_options.py`` holds the options and their --help.

    mlx-unet generate "an astronaut riding a horse" --model stabilityai/stable-diffusion-xl-base-1.0

Images are made one at a time, one seed each (each prompt encoded once), and each written when it
is done: an interruption or a failed write says which were written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np

from .. import demo
from ..cache import converted_pipeline
from ..convert import convert
from ..cpu.heap import reused_heap
from ..configs.base import DTYPES
from ..errors import InputError, MlxUnetWarning
from ..lora import read_lora
from ..lora.apply import checked_scale
from ..model_source import locate
from ..pipelines import few_step, inpaint, previews
from ..pipelines.arguments import RunArguments
from ..pipelines.diffusion import load_pipeline
from ..pipelines.folder import PipelineFolder
from ..pipelines.images import InputImages, check_writable, output_paths, read_inputs, write_png
from ..pipelines.memory import command_tile
from ..pipelines.preflight import check_prompts, check_run
from ..schedulers.names import sampler_name
from . import png_record
from .common import quantization_arguments, run_command
from .generate_options import (FLAGS, STRENGTH, check_sources, lora_spec, merged_settings, preview_path,
                               prompts_of, seeds_from, vae_tiling, widen_weights, without_defaults)


class Progress:
    """One line per stage on stderr: a bar, steps done, seconds per step."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream  # None: sys.stderr as it is at each step (a default bound at import would keep a stale one)
        self.seconds: dict[str, list[float]] = {}

    def __call__(self, stage: str, step) -> None:
        self.seconds.setdefault(stage, []).append(step.seconds)
        if not self.enabled:
            return
        done = step.index + 1
        bar = "#" * (24 * done // step.total)
        end = "\n" if done == step.total else ""
        stream = self.stream or sys.stderr
        stream.write(f"\r{stage:8s} [{bar:24s}] {done}/{step.total}  {step.seconds:.2f} s/step{end}")
        stream.flush()


def _inputs(a: argparse.Namespace, recorded: png_record.Recorded | None, log) -> InputImages | None:
    if a.image is None:
        return None
    inputs = read_inputs(a.image, a.mask, a.height, a.width)
    if inputs.resized:
        h, w = inputs.source_size
        log(f"{a.image}: {w}x{h} resized to {inputs.image.shape[2]}x{inputs.image.shape[1]} (width x height)")
    for name in png_record.INPUTS:
        recorded_digest = None if recorded is None else recorded.digests.get(name)
        path = getattr(a, name)
        if recorded_digest is not None and path is not None and png_record.file_digest(path) != recorded_digest:
            warnings.warn(f"{path} is not the file {a.from_png} was made from (its contents differ); the image will "
                          "differ.", MlxUnetWarning, stacklevel=2)
    return inputs


@contextmanager
def _model_folder(source: str | None, a: argparse.Namespace, quantized: dict[str, Any], log) -> Iterator[Path]:
    """The converted pipeline folder of ``source`` (converted into the cache where it is not one,
    in the run's dtypes and quantization), or the demo's, made on the fly."""
    if source is None:
        with demo.demo_pipeline() as folder:
            yield folder
        return
    with converted_pipeline(source, use_cache=not a.no_cache, dtype=a.dtype, vae_dtype=a.vae_dtype,
                            revision=a.revision, prediction_type=a.prediction_type, allow_pickle=a.allow_pickle,
                            progress=not a.quiet, log=log, **quantized) as folder:
        yield folder


@contextmanager
def _unet_folder(source: str, base: PipelineFolder, a: argparse.Namespace, log) -> Iterator[Path]:
    """--unet's converted folder: as it is where mlx-unet wrote it, else converted for this run
    into a temporary folder (a lone weights file in diffusers' layout with --model's UNet config)."""
    found = locate(source)
    if found.kind in ("converted UNet", "converted"):
        yield found.path if found.kind == "converted UNet" else found.path / "unet"
        return
    temporary = Path(tempfile.mkdtemp(prefix="mlx-unet-"))
    try:
        log(f"converting the UNet {source} for this run (mlx-unet convert --unet-only makes a folder to reuse)")
        convert(source, temporary / "unet", dtype=a.dtype, unet_only=True, allow_pickle=a.allow_pickle,
                config=base.part("unet") if found.kind == "file" else None,
                progress=not a.quiet, link=True)
        yield temporary / "unet"
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


# ---------------------------------------------------------------------------------- the run

def _generate(given: dict[str, Any], log, written: list[Path]) -> int:
    start = time.perf_counter()
    a, recorded = merged_settings(given)
    if recorded is not None:
        log(f"rerunning what made {a.from_png}" + (f", with {', '.join(sorted(given))} given" if len(given) > 1 else ""))
    check_sources(a, recorded)
    prompts = prompts_of(a)
    if a.negative_prompt is not None:
        check_prompts(a.negative_prompt, "--negative-prompt")
    mode = None if a.image is None else "inpaint" if a.mask is not None else "img2img"
    strength = None if mode is None else a.strength if a.strength is not None else STRENGTH[mode]
    # Checked now with the ordinary step count and guidance where none is given; a few-step
    # model's own replace them once its folder is read.
    run = RunArguments(few_step.STEPS if a.steps is None else a.steps,
                       few_step.GUIDANCE if a.guidance is None else a.guidance, 0.0, a.height, a.width, a.batch_size,
                       a.seed, RunArguments.strength if strength is None else strength, a.refiner_start,
                       img2img=mode is not None, refined=a.refiner is not None, flags=FLAGS)
    quantize, quantize_text = quantization_arguments(a)  # checked before anything is read
    # How the models are converted and loaded; text encoders left unquantized are asked for dense.
    quantized = dict(quantize=quantize, quantize_text_encoders=quantize_text or False)
    inputs = _inputs(a, recorded, log)
    paths = output_paths(a.output, len(prompts) * run.num_images_per_prompt)
    preview = preview_path(a, paths)
    tiled_vae, vae_budget = vae_tiling(a)
    seeds = seeds_from(run.seed, run.num_images_per_prompt)
    dtype, vae_dtype = DTYPES[a.dtype], DTYPES[a.vae_dtype] if a.vae_dtype else None
    with ExitStack() as stack:
        def folder(source: str | None) -> PipelineFolder:
            return PipelineFolder.read(stack.enter_context(_model_folder(source, a, quantized, log)))

        base = folder(a.model)
        if a.unet is not None:
            base = base.with_unet(stack.enter_context(_unet_folder(a.unet, base, a, log)))
        refiner_parts = None if a.refiner is None else folder(a.refiner)
        base.check_clip_skip(a.clip_skip, "--clip-skip")
        run, scheduler, sigmas, sampling = _sampling(a, base, run, strength, log)
        tile = command_tile((refiner_parts or base).vae) if tiled_vae else None  # by need: from the VAE's size
        one = dataclasses.replace(run, num_images_per_prompt=1)  # images are made one at a time
        size = None if inputs is None else inputs.image.shape[1:3]
        plan = check_run(one, base, refiner_parts, prompts=1, scheduler=scheduler, sigmas=sigmas, dtype=dtype,
                         vae_dtype=vae_dtype,
                         tiled_vae=tiled_vae, vae_tile=tile, vae_memory_budget=vae_budget, low_memory=a.low_memory,
                         quantize=quantize,
                         quantize_text_encoders=quantize_text, image_size=size,
                         release_unet=len(paths) == 1,  # as _Images: freed before the last image's decode
                         widen_weights=widen_weights(a) is True)
        inpaint.check_arguments(base.unet, None if inputs is None else inputs.mask, size, 1, refiner_parts is not None)
        unet_quantization = base.quantization("unet", quantize)
        # LoRAs go live where the UNet is quantized: fusing into quantized weights is refused.
        lora_mode = a.lora_mode or ("live" if unet_quantization else "fuse")
        if a.lora and lora_mode == "fuse" and unet_quantization:
            raise InputError("--lora-mode fuse cannot fuse LoRAs into a quantized UNet (it would round them away); "
                             "use --lora-mode live, the default for quantized models.")
        # Before loading: a failed write would waste the run.
        check_writable(paths + ([preview] if preview else []), plan.height, plan.width)
        tiny = None  # the tiny VAE's folder, converted before the pipeline loads: its mistakes show at once
        if a.vae == "tiny" or preview is not None:
            tiny_source = a.tiny_vae or previews.default_source(base)
            tiny = stack.enter_context(previews.converted(tiny_source, progress=not a.quiet, log=log))
        specs = [lora_spec(spec) for spec in a.lora]
        adapters = [(read_lora(source, allow_pickle=a.allow_pickle), checked_scale(scale)) for source, scale in specs]
        # Loading and every image in one reused heap (``cpu.heap``), as a pipeline call runs: the
        # prompts are encoded before the first call, and the memory the text encoders free is
        # then where the UNet loads, not fresh pages.
        stack.enter_context(reused_heap())
        pipe = load_pipeline(base, dtype=dtype, vae_dtype=vae_dtype, **quantized)
        refiner = None if refiner_parts is None else \
            load_pipeline(refiner_parts, dtype=dtype, vae_dtype=vae_dtype, **quantized)
        decoder = (refiner or pipe).vae
        if tiled_vae is None:
            decoder.enable_tiling_by_need(vae_budget)
        elif tiled_vae:
            decoder.enable_tiling(tile)
        else:
            decoder.disable_tiling()
        if tiny is not None:
            pipe.load_tiny_vae(tiny, vae_dtype)
            log(f"tiny VAE {tiny_source}" + (f"; previews every {a.preview_every} steps: {preview}" if preview else ""))
        seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
        log(f"loaded {a.model or 'the demo pipeline'}, {base.family}, in {time.perf_counter() - start:.1f} s; "
            f"{seed_text}; estimated peak memory {plan.estimate.peak / 2**30:.2f} GiB")
        for part, q in (("UNet", unet_quantization),
                        ("text encoders", base.quantization(base.text_encoder_names[-1], quantize_text))):
            if q is not None:
                log(f"{part}: {q.describe()}")
        for lora, scale in adapters:
            pipe.load_lora(lora, scale, fuse=lora_mode == "fuse")
            log(f"LoRA {lora.describe()}; scale {scale:g}, {'fused' if lora_mode == 'fuse' else 'live'}")
        # What each image records: the options, with what the run resolved in place of defaults.
        resolved = vars(a) | dict(height=plan.height, width=plan.width, strength=strength, steps=run.steps,
                                  guidance=run.guidance, tiny_vae=a.tiny_vae if a.vae == "tiny" else None, **sampling)
        model_name = a.model or demo.MODEL_NAME
        progress = Progress(not a.quiet)
        images = _Images(pipe, refiner, run, a, (scheduler, sigmas), inputs, strength, _previewing(progress, preview),
                         log, total=len(paths))
        images.encode(prompts)
        made = ((prompt, seed, image) for prompt in prompts for seed, image in images.of(prompt, seeds))
        for path, (prompt, seed, image) in zip(paths, made):
            settings = resolved | dict(prompt=prompt, seed=seed)
            _write(path, image, png_record.png_text(settings, model_name, specs), written)
    for stage, seconds in progress.seconds.items():
        # The first step includes one-time work (kernel builds, weight reads): the median is typical.
        log(f"{stage}: {len(seconds)} steps, median {np.median(seconds):.2f} s/step")
    log(f"wrote {_listing(written)} in {time.perf_counter() - start:.1f} s; "
        f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB")
    return 0


class _Images:
    """A prompt's images, one seed at a time. Each distinct prompt is encoded once, all of them
    before the first image while the text encoders are loaded (where no refiner needs them
    encoded again by its own encoders)."""

    def __init__(self, pipe, refiner, run: RunArguments, a: argparse.Namespace, sampling: tuple,
                 inputs: InputImages | None,
                 strength: float | None, callback, log, total: int):
        self.pipe, self.refiner, self.run, self.a, self.log, self.total = pipe, refiner, run, a, log, total
        self.options = dict(steps=run.steps, guidance=run.guidance, height=None if inputs else run.height,
                            width=None if inputs else run.width, scheduler=sampling[0], sigmas=sampling[1],
                            low_memory=a.low_memory, widen_weights=widen_weights(a),
                            callback=callback, preview_every=a.preview_every, vae=a.vae or "full",
                            image=None if inputs is None else inputs.image,
                            mask_image=None if inputs is None else inputs.mask, strength=strength)
        if refiner is not None:
            self.options.update(refiner=refiner, refiner_start=run.refiner_start)
        self.count = 0
        self.embeddings: dict[str, Any] = {}
        self.text = dict(clip_skip=a.clip_skip, prompt_weighting=not a.no_prompt_weighting, max_tokens=a.max_tokens)

    def encode(self, prompts: list[str]) -> None:
        """Encode each distinct prompt of ``prompts``, the text encoders loaded once for all."""
        if self.refiner is not None:
            return
        a, pipe, keep = self.a, self.pipe, self.pipe.keep_text_encoders
        pipe.keep_text_encoders = True
        try:
            for prompt in dict.fromkeys(prompts):
                self.embeddings[prompt] = pipe.encode_prompt(prompt, a.negative_prompt,
                                                             guided=self.run.guided(pipe.parts.unet), **self.text)
        finally:
            pipe.keep_text_encoders = keep
            if not keep:
                pipe.release_text_encoders()

    def of(self, prompt: str, seeds: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        a = self.a
        if self.refiner is None:
            texts = dict(prompt=None, prompt_embeds=self.embeddings[prompt])
        else:
            texts = dict(prompt=prompt, negative_prompt=a.negative_prompt, **self.text)
        for seed in seeds:
            self.count += 1
            if self.total > 1:
                self.log(f"image {self.count}/{self.total}: seed {seed}, {prompt!r}")
            # The last image's decode has the memory to itself: nothing needs the UNet after it.
            yield seed, self.pipe(**texts, seed=seed, release_unet=self.count == self.total, **self.options)[0]


def _sampling(a: argparse.Namespace, base: PipelineFolder, run: RunArguments, strength: float | None,
              log) -> tuple[RunArguments, Any, str | None, dict[str, Any]]:
    """The run with a few-step model's defaults (``pipelines.few_step``) where none were given;
    its sampler (a name, or the scheduler a few-step model's settings make) and sigma schedule
    for the pipeline; and both by our names, for the record."""
    sources = (a.model, a.unet, *[lora_spec(x)[0] for x in a.lora])
    names = [png_record.short_name(s) for s in sources if s is not None]
    defaults = few_step.run_defaults(base, names)
    steps = defaults.steps if a.steps is None else a.steps
    if a.steps is None and strength is not None:
        steps = max(steps, math.ceil(1 / strength))  # img2img runs strength x steps: at least one
    run = dataclasses.replace(run, steps=steps, guidance=defaults.guidance if a.guidance is None else a.guidance)
    if defaults.size is not None and a.image is None and a.height is None and a.width is None:
        run = dataclasses.replace(run, height=defaults.size, width=defaults.size)
    # Our names: "DPM++ 2M Karras" is dpmpp_2m on Karras sigmas.
    sampler, named_sigmas = sampler_name(a.scheduler or defaults.sampler or base.sampler_name())
    if a.sigmas is not None and named_sigmas not in (None, a.sigmas):
        raise InputError(f"--scheduler {a.scheduler!r} means {named_sigmas} sigmas; leave out --sigmas {a.sigmas}.")
    sigmas = a.sigmas or named_sigmas
    recorded = dict(scheduler=sampler, sigmas=sigmas)
    if defaults is not few_step.ORDINARY:
        log(f"few-step model, {defaults.describe()} (--steps, --guidance and --scheduler replace these)")
    if defaults is few_step.ORDINARY or a.refiner is not None:  # a refiner takes a name, for its own config
        return run, sampler, sigmas, recorded
    scheduler = base.make_scheduler(sampler, sigmas, **defaults.scheduler_config)
    if defaults.timesteps and a.scheduler is None and a.sigmas is None and steps == len(defaults.timesteps):
        scheduler.custom_timesteps = lambda n: list(defaults.timesteps)
    return run, scheduler, None, recorded


def _previewing(progress: Progress, path: Path | None):
    """The run's callback: the progress line, and the preview written to ``path`` when one is due
    (through a temporary file renamed over it: a viewer never reads half an image)."""
    if path is None:
        return progress

    def callback(stage: str, step) -> None:
        progress(stage, step)
        if step.preview is not None:
            write_png(path, step.preview[0])

    return callback


def _listing(paths: Sequence[Path]) -> str:
    return ", ".join(map(str, paths)) or "nothing"


def _write(path: Path, image: np.ndarray, text: dict[str, str], written: list[Path]) -> None:
    try:
        write_png(path, image, text)
    except OSError as e:  # said with what the run did write
        raise OSError(e.errno, f"{e.strerror}: {path}; written before it: {_listing(written)}") from None
    written.append(path)


def main(argv: Sequence[str] | None = None) -> int:
    given = vars(without_defaults().parse_args(argv))  # the options typed; usage errors and --help
    log = (lambda msg: None) if given.get("quiet") else (lambda msg: print(msg, file=sys.stderr))
    written: list[Path] = []
    return run_command(lambda: _generate(given, log, written),
                       lambda: f"wrote {_listing(written)}" if written else "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
