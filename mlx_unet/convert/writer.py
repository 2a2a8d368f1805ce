"""``convert()``: plans checked, then written tensor by tensor into a folder that appears only
when complete (written beside it, then renamed into place); quantized models' layers are
quantized one at a time as they stream (``quantized.py``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from ..configs.base import DTYPES, FORMAT_VERSION, SECTION, section
from ..configs.quantization import Quantization
from ..configs.unet import UNetConfig
from ..cpu.heap import reused_heap
from ..errors import ConversionError, MlxUnetWarning, NonFiniteWarning, WeightsError
from ..linked import Link, holds_exactly, write_links
from ..safetensors_io import TensorSpec, write_safetensors
from ..finite import all_finite
from ..weights import check_shapes, model_shapes, taken_parameter, torch_to_mlx_shape
from .layout import MODEL_INDEX, SCHEDULER_CONFIG, Options
from .plan import PipelinePlan, Plan, check_widths
from .quantized import ModelQuantization, choose_quantization, model_quantization, quantized_specs, summary
from .resolve import check_out_dir_apart, plan_source
from .sources import SafetensorsSource

OUTPUT_WEIGHTS = "model.safetensors"
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet predicts: the noise, or v (SD 2.x 768)
WARNING = "warning: "  # the prefix of a plan's notes that are warnings


class _Progress:
    """One line, redrawn in place on a terminal; every 10% as a new line otherwise."""

    def __init__(self, total: int, enabled: bool, stream=None):
        # sys.stderr as it is now, not as it was at import (a default argument would keep that one).
        stream = sys.stderr if stream is None else stream
        self.total, self.done, self.enabled, self.stream = max(total, 1), 0, enabled, stream
        self.tty = stream.isatty()
        self.last_decile = -1

    def __call__(self, nbytes: int) -> None:
        if not self.enabled:
            return
        self.done += nbytes
        pct = 100 * self.done // self.total
        text = f"converting: {pct:3d}% ({self.done / 1e9:.2f} / {self.total / 1e9:.2f} GB)"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if self.done >= self.total else ""))
            self.stream.flush()
        elif pct // 10 > self.last_decile:
            self.last_decile = pct // 10
            print(text, file=self.stream, flush=True)


@dataclass
class ConversionResult:
    out_dir: Path
    config: UNetConfig | None  # None where the source holds a tiny VAE alone
    tensors: int
    bytes: int
    nonfinite: list[str]
    notes: list[str]
    configs: dict[str, Any] = field(default_factory=dict)  # every model written, by component name
    dtypes: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, Quantization] = field(default_factory=dict)  # the models written quantized


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConversionError(f"{out_dir} exists and is not empty; pass --force to replace it.")


def _replace_dir_atomically(out_dir: Path, write: Callable[[Path], None], force: bool) -> None:
    """Run ``write`` on a fresh folder beside ``out_dir``, then rename it into place.

    On any failure the partial folder is removed and an existing ``out_dir`` is left untouched.
    """
    _check_out_dir(out_dir, force)
    created = _make_parents(out_dir.parent)
    old = partial = None
    try:
        partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
        write(partial)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary folder
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.rename(out_dir, old / "previous")
        os.rename(partial, out_dir)
    except BaseException:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not out_dir.exists():
            os.rename(old / "previous", out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for folder in created:  # deepest first; only what this call made, and only if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; the folders it created, deepest first, for a failure to remove."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir()
    return missing


def _checked_shapes(plan: Plan, model) -> dict[str, tuple[int, ...]]:
    """The (dense) model's parameter shapes, after checking the plan supplies exactly them."""
    expected = model_shapes(model)
    given = {d: torch_to_mlx_shape(take.shape(plan.source.shapes[take.key])) for d, take in plan.names.items()}
    try:
        check_shapes(expected, given, plan.kind.what)
    except WeightsError as e:
        raise WeightsError(f"{plan.description}: {e}") from None
    return expected


def _specs(plan: Plan, expected: dict[str, tuple[int, ...]], nonfinite: list[str], label: str,
           quantized: ModelQuantization | None = None) -> list[TensorSpec]:
    """One spec per output tensor, in the order written; a quantized layer's weight gives three,
    side by side, from one read of the dense weight (``quantized_specs``)."""
    target = DTYPES[plan.dtype]

    def produce(name: str) -> Callable[[], mx.array]:
        def read() -> mx.array:
            take = plan.names[name]
            array = taken_parameter(plan.source.read(take.key), take, target)
            if not all_finite(array).item():
                nonfinite.append(label + name)
            return array

        return read

    specs = []
    for n in sorted(plan.names):
        if quantized is not None and n.endswith(".weight") and n[: -len(".weight")] in quantized.paths:
            specs += quantized_specs(n, expected[n], target, quantized.quantization, produce(n))
        else:
            specs.append(TensorSpec(n, expected[n], target, produce(n)))
    return specs


def linkable(plan: Plan) -> bool:
    """Whether ``plan``'s model, converted, would hold every value as its safetensors source
    stores it: what ``convert(link=True)`` links instead of copying."""
    if not isinstance(plan.source, SafetensorsSource):
        return False
    return holds_exactly(plan.dtype, {plan.source.readers[t.key].tensors[t.key].dtype for t in plan.names.values()})


def _links(plan: Plan) -> dict[str, Link]:
    return {name: Link(plan.source.readers[take.key].path, take) for name, take in plan.names.items()}


def _write_weights(path: Path, specs: list[TensorSpec], metadata: dict[str, str], show: _Progress,
                   shown_path: Path) -> None:
    try:
        write_safetensors(path, specs, metadata, on_tensor=lambda spec: show(spec.nbytes))
    except OSError as e:  # a full disk names no file: name the one being written, as it will be called
        raise OSError(e.errno, e.strerror or str(e), str(shown_path)) from None


def _config_dict(plan: Plan, quantized: ModelQuantization | None) -> dict[str, Any]:
    """config.json: the model's, with the quantization in our section where it is quantized."""
    data = plan.kind.config_dict(plan.config)
    if quantized is not None:
        data[SECTION] = section(quantization=quantized.quantization.to_dict())
    return data


def _write_pipeline_files(folder: Path, pipeline: PipelinePlan) -> None:
    for name, files in pipeline.tokenizers.items():
        (folder / name).mkdir()
        for file, content in files.items():
            (folder / name / file).write_bytes(content)
    (folder / "scheduler").mkdir()
    (folder / SCHEDULER_CONFIG).write_text(json.dumps(pipeline.scheduler, indent=2) + "\n")
    (folder / MODEL_INDEX).write_text(json.dumps(pipeline.model_index, indent=2) + "\n")


def check_output_options(dtype: str, vae_dtype: str | None, prediction_type: str | None) -> None:
    """The options that shape a conversion's output, checked before anything is read."""
    for name, value in (("dtype", dtype), ("vae_dtype", vae_dtype)):
        if value is not None and value not in DTYPES:
            raise ConversionError(f"{name} {value!r} is not one of {', '.join(DTYPES)}.")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConversionError(f"prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}.")


def convert(
    source: str | Path,
    out_dir: str | Path,
    dtype: str = "float16",
    variant: str | None = None,
    revision: str | None = None,
    force: bool = False,
    ema: bool = False,
    allow_pickle: bool = False,
    config: str | Path | None = None,
    progress: bool = True,
    unet_only: bool = False,
    vae_dtype: str | None = None,
    tokenizers: str | Path | None = None,
    quantize: Quantization | int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    quantize_text_encoders: Quantization | int | str | bool | None = None,
    prediction_type: str | None = None,
    link: bool = False,
) -> ConversionResult:
    """Convert an SD 1.x / 2.x or SDXL pipeline (or, with ``unet_only``, a UNet) to an MLX folder.

    ``source``: a Hub repo id, a diffusers folder, or an original single-file checkpoint. A source
    that holds only a UNet is written as with ``unet_only`` (``UNet2DConditionModel.from_pretrained``
    loads it); one that holds only a tiny VAE (diffusers' AutoencoderTiny: madebyollin/taesd,
    madebyollin/taesdxl) is written so too, in ``vae_dtype`` or else ``dtype``
    (``AutoencoderTiny.from_pretrained`` loads it). Pipelines: text-to-image, img2img and inpainting ones (9-channel UNets), SDXL's
    refiner; a single file is written as its family's published pipeline (``published.py``).
    ``dtype``: the UNet's and text encoders'; ``vae_dtype``: the VAE's (default float32, or
    ``dtype`` when its config says ``force_upcast: false``).
    ``config``: a diffusers UNet config.json (or folder) to use instead of the source's or the inferred one.
    ``tokenizers``: a diffusers pipeline folder or Hub repo id to copy the tokenizers from (default: the
    source's own; for single files, CLIP's vocabulary that ships with mlx-unet, padded as the family's are).
    ``prediction_type``: "epsilon" or "v_prediction", written into the scheduler config in place of the
    source's (or, for single files, the family's: diffusers cannot tell an SD 2.x 512 epsilon model from
    a 768 v-prediction one by its weights, and assumes v-prediction, as here).
    ``quantize``: 8 or 4 (or a ``Quantization``): the UNet's Linear layers that ``mlx_unet.quantize``'s
    policy takes are written quantized (``q_group_size``: 32, 64 or 128, default 64; ``q_mode``:
    affine (default), or mxfp8 / mxfp4 where MLX has them); scales and biases in ``dtype``.
    ``quantize_text_encoders``: None (default: 8 bits with ``quantize``, in its group size and mode
    family; dense without), 8 or 4 (likewise), a ``Quantization``, or False / "none" (dense). The
    VAE stays dense. Each quantized model's config.json records its settings (``mlx_unet`` section).
    ``link``: each dense model that converting would leave value for value as the source holds it
    (safetensors weights all in its dtype, or in a half precision for a float32 model:
    ``linkable``) is written as a table of where its tensors lie in the source
    (``mlx_unet.linked``) instead of a copy; loading it reads the source, which must then stay
    where it is, unchanged. The cache links local sources.
    Raises an ``MlxUnetError`` for unusable input; nothing is written then.
    """
    check_output_options(dtype, vae_dtype, prediction_type)
    pipeline_only = [flag for flag, value in (("--vae-dtype", vae_dtype), ("--tokenizers", tokenizers),
                                              ("--prediction-type", prediction_type)) if value]
    if unet_only and pipeline_only:
        it = "it" if len(pipeline_only) == 1 else "them"
        raise ConversionError(f"{' and '.join(pipeline_only)} {'is' if it == 'it' else 'are'} for whole pipelines; "
                              f"drop {it} with --unet-only.")
    quantization = choose_quantization(quantize, q_group_size, q_mode, quantize_text_encoders, unet_only)
    out_dir = Path(out_dir)
    tokenizers = None if tokenizers is None else str(tokenizers)
    # Before any download or reading.
    check_out_dir_apart(out_dir, str(source), tokenizers)
    _check_out_dir(out_dir, force)
    override = UNetConfig.from_json(config) if config is not None else None
    options = Options(dtype, vae_dtype, variant, revision, allow_pickle, ema, override, prediction_type)
    planned = plan_source(str(source), options, unet_only, tokenizers)
    pipeline = planned if isinstance(planned, PipelinePlan) else None
    layout = pipeline.models if pipeline else {"": planned}  # output subfolder -> model

    models = {sub: plan.kind.build(plan.config) for sub, plan in layout.items()}  # lazily: nothing is allocated
    expected = {sub: _checked_shapes(plan, models[sub]) for sub, plan in layout.items()}
    if pipeline:
        check_widths(pipeline.models)
    quantized: dict[str, ModelQuantization] = {}
    dense_notes = []
    for sub in layout:
        wanted = quantization.for_model(sub)
        if wanted is not None:
            found = model_quantization(models[sub], wanted)
            if found.paths:
                quantized[sub] = found
            else:
                dense_notes.append(f"{WARNING}the {layout[sub].kind.what} is written dense: none of its Linear "
                                   f"layers can be quantized {wanted.describe()} (none outside the groups kept dense "
                                   f"has an input width that groups of {wanted.group_size} divide)")
    del models
    linked = {sub for sub, plan in layout.items() if link and sub not in quantized and linkable(plan)}
    if quantization.text_asked and not any(sub in ("text_encoder", "text_encoder_2") for sub in layout):
        dense_notes.append(f"{WARNING}--quantize-text-encoders: the output has no text encoders (the source holds "
                           "only a UNet)")

    notes = (pipeline.notes if pipeline else []) + [n for plan in layout.values() for n in plan.notes] + dense_notes
    log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if pipeline:
        log(f"source: {pipeline.description}")
        for sub, plan in layout.items():
            how = f", {quantized[sub].describe()}" if sub in quantized else ""
            how += ", linked to the source" if sub in linked else ""
            log(f"  {sub}: {plan.description}, {len(plan.names)} tensors -> {plan.dtype}{how}")
    else:
        log(f"source: {planned.description}, {len(planned.names)} {planned.kind.what} tensors")
        if "" in quantized:
            log(f"  quantized: {quantized[''].describe()}")
    for note in notes:
        if note.startswith(WARNING):  # what the user asked for that was not done: never silenced
            warnings.warn(MlxUnetWarning(note[len(WARNING):]), stacklevel=2)
        else:
            log(f"  {note}")

    nonfinite: list[str] = []
    specs = {sub: _specs(plan, expected[sub], nonfinite, f"{sub}/" if sub else "", quantized.get(sub))
             for sub, plan in layout.items() if sub not in linked}
    total = sum(spec.nbytes for group in specs.values() for spec in group)
    show = _Progress(total, progress)

    def write(folder: Path) -> None:
        if pipeline:
            _write_pipeline_files(folder, pipeline)
        for sub, plan in layout.items():
            (folder / sub).mkdir(exist_ok=True)
            metadata = {"format": "mlx", "mlx_unet_format_version": FORMAT_VERSION, "source": plan.description,
                        "dtype": plan.dtype}
            if sub in quantized:
                metadata["quantization"] = quantized[sub].quantization.describe()
            if sub in linked:
                write_links(folder / sub, _links(plan), plan.dtype, plan.description)
            else:
                _write_weights(folder / sub / OUTPUT_WEIGHTS, specs[sub], metadata, show, out_dir / sub / OUTPUT_WEIGHTS)
            (folder / sub / "config.json").write_text(json.dumps(_config_dict(plan, quantized.get(sub)), indent=2) + "\n")

    # Each tensor's buffers (read, laid out, cast, written) are freed before the next: in a reused
    # heap, the next tensor's come from them, where large ones were fresh memory every time
    # (a float32 conversion of SDXL faulted in 30 GiB).
    with reused_heap():
        _replace_dir_atomically(out_dir, write, force)
    if nonfinite:
        shown = ", ".join(nonfinite[:5]) + (f", ... ({len(nonfinite) - 5} more)" if len(nonfinite) > 5 else "")
        warnings.warn(NonFiniteWarning(
            f"{len(nonfinite)} tensors hold NaN or inf values after conversion to {dtype} ({shown}); the model will "
            "likely make black images: check the source, or convert to float32 if float16 overflowed."), stacklevel=2)
    name = {sub: sub or plan.kind.alone for sub, plan in layout.items()}  # a model alone by its kind
    dtypes = {name[sub]: plan.dtype for sub, plan in layout.items()}
    written = {name[sub]: q for sub, q in quantized.items()}
    dense_total = sum(math.prod(shape) * DTYPES[plan.dtype].size for sub, plan in layout.items()
                      for shape in expected[sub].values())
    how = f"; dense {dense_total / 1e9:.2f} GB; {summary(written, list(dtypes))}" if written else ""
    how += f"; {', '.join(sorted(name[sub] for sub in linked))} linked to the source" if linked else ""
    size = f"{total / 1e9:.2f} GB, " if specs else ""  # none where every model is linked
    log(f"wrote {out_dir} ({size}{', '.join(sorted(set(dtypes.values())))}{how})")
    configs = {name[sub]: plan.config for sub, plan in layout.items()}
    return ConversionResult(out_dir, configs.get("unet"), sum(len(g) for g in specs.values()), total, nonfinite, notes,
                            configs, dtypes, {c: q.quantization for c, q in written.items()})
