"""Plans: what each model to write is, and where each of its parameters comes from; for diffusers
folders here (single files: ``single_file.py``), and the checks that models belong together."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import jsonfile
from ..configs.base import FORMAT_KEY, FORMAT_VERSION
from ..configs.pipeline import check_components_fit
from ..errors import ConfigError, ConversionError
from ..naming import Take
from .hub import fetch_tokenizers
from .layout import MODEL_INDEX, MODELS, SCHEDULER_CONFIG, TINY_VAE, TOKENIZERS, UNET, ModelKind, Options, listed, \
    read_json, unet_folder, weight_files
from .sources import TensorSource, open_tensors
from .tokenizer_files import TOKENIZER_CLASSES, pipeline_tokenizers


@dataclass
class Plan:
    """One model to write: its config and dtype, and where each parameter comes from."""

    kind: ModelKind
    config: Any
    source: TensorSource
    names: dict[str, Take]
    description: str
    dtype: str
    notes: list[str] = field(default_factory=list)


@dataclass
class PipelinePlan:
    """A whole pipeline: its models, and the files that are copied or written beside them."""

    models: dict[str, Plan]
    tokenizers: dict[str, dict[str, bytes]]  # "tokenizer_2" -> its files, by name
    scheduler: dict[str, Any]
    model_index: dict[str, Any]
    description: str
    notes: list[str] = field(default_factory=list)


def plan_model_folder(kind: ModelKind, folder: Path, dtype: str, options: Options, config: Any = None) -> Plan:
    """A diffusers (or transformers) model folder: names are kept, as the model's are theirs."""
    config = config or kind.parse_config(folder / "config.json")
    files = weight_files(folder, kind, options.variant, dtype == "float16")
    source = open_tensors(files, options.allow_pickle)
    names = {ours: Take(key) for ours, key in kind.names(source.shapes).items()}
    shown = files[0].name if len(files) == 1 else f"{len(files)} shards"
    return Plan(kind, config, source, names, f"diffusers folder {folder} ({shown})", dtype)


def plan_unet_folder(folder: Path, options: Options) -> Plan:
    return plan_model_folder(UNET, unet_folder(folder), options.dtype, options, options.unet_config)


def only_unet(plan: Plan) -> Plan:
    plan.notes.append("the source holds only a UNet: writing it alone (config.json + model.safetensors)")
    return plan


def plan_lone_folder(folder: Path, options: Options) -> Plan:
    """A folder of one model (or a pipeline root, for its UNet): a tiny VAE where its config
    says AutoencoderTiny, else a UNet."""
    folder = unet_folder(folder)
    config = folder / "config.json"
    # Read as the model's config is (a ConfigError), whichever model it turns out to describe.
    if not (config.is_file() and jsonfile.read_json(config, "config.json", ConfigError).get("_class_name")
            in TINY_VAE.classes):
        return only_unet(plan_model_folder(UNET, folder, options.dtype, options, options.unet_config))
    if options.unet_config is not None:
        raise ConversionError(f"{folder} holds a tiny VAE (AutoencoderTiny), which --config (a UNet config) cannot "
                              "describe; drop --config.")
    # A VAE's dtype, where one is asked; it runs in float16 as well, so by default it takes --dtype.
    return plan_model_folder(TINY_VAE, folder, options.vae_dtype or options.dtype, options)


def _output_index(index: dict[str, Any], written: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The source's model_index.json with the components not written set to null (diffusers'
    "absent"), and our format marker; and the names of those left out."""
    out, left = {}, []
    for key, value in index.items():
        if not key.startswith("_") and listed(index, key) and key not in written:
            left.append(key)
            value = [None, None]
        out[key] = value
    out[FORMAT_KEY] = FORMAT_VERSION
    return out, left


# model_index.json's _class_name -> the text encoders its pipeline runs (by TOKENIZERS' names):
# the pipelines mlx-unet runs, so converts whole.
_TASKS = ("", "Img2Img", "Inpaint")
PIPELINES: dict[str, tuple[str, ...]] = {
    **{f"StableDiffusion{task}Pipeline": ("text_encoder",) for task in _TASKS},
    **{f"StableDiffusionXL{task}Pipeline": ("text_encoder", "text_encoder_2") for task in _TASKS},
}


def with_prediction_type(scheduler: dict[str, Any], options: Options, notes: list[str]) -> dict[str, Any]:
    """The scheduler config with ``--prediction-type`` applied (noted where it changes it)."""
    wanted = options.prediction_type
    if wanted is None or scheduler.get("prediction_type", "epsilon") == wanted:
        return scheduler
    notes.append(f"prediction type: {wanted} (--prediction-type), instead of the scheduler config's "
                 f"{scheduler.get('prediction_type', 'epsilon')}")
    return {**scheduler, "prediction_type": wanted}


def _pipeline_models(folder: Path, index: dict[str, Any], kind: str) -> tuple[str, ...]:
    """The models of pipeline ``kind`` to convert, after checking the index lists what it needs."""
    encoders = PIPELINES.get(kind)
    if encoders is None:
        raise ConversionError(
            f"{folder} is a {kind} pipeline, which mlx-unet does not run (it converts SD 1.x, 2.x and SDXL "
            "text-to-image, img2img and inpainting pipelines whole): pass --unet-only to convert its UNet."
        )
    required = ("unet", "vae", "scheduler", encoders[-1], TOKENIZERS[encoders[-1]])
    for name in required:
        if not listed(index, name):
            raise ConversionError(f"{folder / MODEL_INDEX} lists no {name}; a {kind} needs one.")
    for encoder in encoders:
        if bool(listed(index, encoder)) != bool(listed(index, TOKENIZERS[encoder])):
            raise ConversionError(f"{folder / MODEL_INDEX} lists only one of {encoder} and {TOKENIZERS[encoder]}; "
                                  "it needs both or neither.")
    return ("unet", "vae", *(e for e in encoders if listed(index, e)))


def plan_pipeline_folder(folder: Path, options: Options, tokenizers: str | None = None) -> PipelinePlan:
    """A diffusers SD 1.x / 2.x or SDXL pipeline folder (text-to-image, img2img, inpainting, refiner)."""
    index = read_json(folder / MODEL_INDEX, "model_index.json")
    kind = index.get("_class_name", "diffusers")
    names = _pipeline_models(folder, index, kind)
    models = {}
    for name in (n for n in MODELS if n in names):
        model, entry = MODELS[name], listed(index, name)
        if entry not in model.classes:
            raise ConversionError(
                f"{folder / MODEL_INDEX} says {name} is a {entry}; only {' or '.join(model.classes)} is supported there."
            )
        if not (folder / name / "config.json").is_file():
            raise ConversionError(f"{folder / name / 'config.json'} is missing ({MODEL_INDEX} lists {name}); download it again.")
        config = options.unet_config if name == "unet" and options.unet_config else model.parse_config(folder / name / "config.json")
        if name in TOKENIZERS and config.architecture not in model.classes:
            raise ConversionError(
                f"{folder / name / 'config.json'} describes a {config.architecture}; the {model.what} of a {kind} is a "
                f"{model.classes[0]}."
            )
        models[name] = plan_model_folder(model, folder / name, options.dtype_of(name, config), options, config)
    for name in TOKENIZERS.values():
        entry = listed(index, name)
        if entry is not None and entry not in TOKENIZER_CLASSES:
            raise ConversionError(f"{folder / MODEL_INDEX} says {name} is a {entry}; only a CLIPTokenizer is supported there.")
    copied = pipeline_tokenizers(fetch_tokenizers(tokenizers) if tokenizers else folder, models)
    notes: list[str] = []
    scheduler = with_prediction_type(read_json(folder / SCHEDULER_CONFIG, "scheduler config"), options, notes)
    model_index, left = _output_index(index, {*models, *copied, "scheduler"})
    if left:  # (safety_checker, feature_extractor: diffusers' SD pipelines run without them)
        notes.insert(0, f"left alone: {', '.join(left)}")
    if tokenizers:
        notes.append(f"tokenizers from {tokenizers}")
    return PipelinePlan(models, copied, scheduler, model_index, f"diffusers pipeline {folder} ({kind})", notes)


def check_widths(models: dict[str, Plan]) -> None:
    """The models must fit together: token states, pooled embedding and latents."""
    encoders = [models[n].config for n in TOKENIZERS if n in models]
    try:
        check_components_fit(models["unet"].config, encoders, models["vae"].config)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
