"""PyTorch SDXL checkpoints -> MLX model folders.

By default a whole pipeline, laid out as diffusers lays one out: ``unet/``, ``text_encoder/``
(not in a refiner), ``text_encoder_2/`` and ``vae/`` (each ``config.json`` + ``model.safetensors``
in MLX layout), ``tokenizer/``, ``tokenizer_2/`` and ``scheduler/`` (copied files), and
``model_index.json``. With ``unet_only``, and for a source that holds nothing but a UNet, the
UNet alone: ``config.json`` + ``model.safetensors``.

Sources: a Hub repo id, a diffusers folder, or an original single-file checkpoint. Tensors stream
one at a time from the source to the output files, and the output folder appears only when
complete (written beside it, then renamed into place).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn

from .configs.clip import CLIPTextConfig
from .configs.unet import UNetConfig
from .configs.vae import VAEConfig
from .configs.base import DTYPES, FORMAT_KEY, FORMAT_VERSION
from .errors import ConfigError, ConversionError, MlxUnetError, WeightsError
from .safetensors_io import SafetensorsReader, TensorSpec, write_safetensors
from .schedulers import SDXL_SCHEDULER_CONFIG
from .single_file import SingleFileUNet, Take, describe_non_unet, ema_name, parse
from .single_file_components import EMBEDDERS, VAE_PREFIX, parse_text_encoders, parse_vae
from .models.clip import CLIPTextModel, checkpoint_names
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL
from .tokenizer import CLIPTokenizer
from .weights import check_shapes, model_shapes, torch_to_mlx_layout, torch_to_mlx_shape

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
WEIGHTS = "diffusion_pytorch_model"
OUTPUT_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# What CLIPTokenizer.from_folder reads; the first two are the tokenizer itself.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# An added token's entry in tokenizer_config.json's added_tokens_decoder, as transformers 4.34+ writes it.
_ADDED_TOKEN_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Prefixes of an original single file's parts other than the UNet.
_OTHER_PARTS = (VAE_PREFIX, EMBEDDERS, "cond_stage_model.")




# ---------------------------------------------------------------------- tensor sources


class TensorSource:
    """Tensors by key, PyTorch layout: ``shapes`` up front, values read one at a time."""

    shapes: dict[str, tuple[int, ...]]

    def read(self, key: str) -> mx.array:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    def __init__(self, files: Sequence[Path]):
        self.readers: dict[str, SafetensorsReader] = {}
        self.shapes = {}
        for file in files:
            reader = SafetensorsReader(file)
            for key, info in reader.tensors.items():
                if key in self.readers:
                    raise ConversionError(f"tensor {key!r} appears in both {self.readers[key].path.name} and {file.name}.")
                self.readers[key] = reader
                self.shapes[key] = info.shape

    def read(self, key: str) -> mx.array:
        return self.readers[key].read(key)


class PickleSource(TensorSource):
    """A torch pickle, loaded with ``weights_only=True`` (no arbitrary code), only on request."""

    def __init__(self, files: Sequence[Path]):
        try:
            import torch
        except ImportError:
            raise ConversionError("reading a pickle checkpoint needs PyTorch: pip install torch.") from None
        self.tensors = {}
        for file in files:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many kinds for corrupt or unsafe pickles
                raise ConversionError(f"{file} could not be loaded as a weights-only PyTorch pickle ({e}).") from None
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]  # Lightning .ckpt
            if not isinstance(obj, dict):
                raise ConversionError(f"{file} does not hold a state dict (it holds {type(obj).__name__}).")
            self.tensors.update({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
        self.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}

    def read(self, key: str) -> mx.array:
        import torch

        tensor = self.tensors[key]
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
        return mx.array(tensor.numpy())


def _open_tensors(files: Sequence[Path], allow_pickle: bool) -> TensorSource:
    pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    if not pickles:
        return SafetensorsSource(files)
    if not allow_pickle:
        raise ConversionError(
            f"{pickles[0]} is a PyTorch pickle, and loading a pickle can run code hidden in it. Prefer a "
            ".safetensors file; if you trust this one, pass --allow-pickle (it is then loaded with "
            "torch.load(weights_only=True))."
        )
    return PickleSource(files)


# ---------------------------------------------------------------------- the kinds of model


def _same_names(keys: Iterable[str]) -> dict[str, str]:
    return {k: k for k in keys}


def _text_encoder_names(keys: Iterable[str]) -> dict[str, str]:
    # transformers 5 saves a bare CLIPTextModel without the text_model. prefix, and older files
    # hold the position_ids buffer: the text encoder module owns that rule.
    return checkpoint_names({k: k for k in keys})


@dataclass(frozen=True)
class ModelKind:
    """What differs between the pipeline's models when converting them."""

    what: str
    classes: tuple[str, ...]  # the model_index.json class names this kind converts
    weights: str  # weights file stem: diffusers and transformers name their files differently
    pickle_weights: str
    parse_config: Callable[[Path], Any]
    build: Callable[[Any], nn.Module]
    config_dict: Callable[[Any], dict]
    names: Callable[[Iterable[str]], dict[str, str]] = _same_names  # our name -> key in a diffusers-layout file


UNET = ModelKind("UNet", ("UNet2DConditionModel",), WEIGHTS, WEIGHTS, UNetConfig.from_json, UNet2DConditionModel,
                 UNetConfig.to_diffusers_dict)
MODELS: dict[str, ModelKind] = {
    "unet": UNET,
    "text_encoder": ModelKind("text encoder", ("CLIPTextModel",), "model", "pytorch_model", CLIPTextConfig.from_json,
                              CLIPTextModel, CLIPTextConfig.to_transformers_dict, _text_encoder_names),
    "text_encoder_2": ModelKind("second text encoder", ("CLIPTextModelWithProjection",), "model", "pytorch_model",
                                CLIPTextConfig.from_json, CLIPTextModel, CLIPTextConfig.to_transformers_dict,
                                _text_encoder_names),
    "vae": ModelKind("VAE", ("AutoencoderKL",), WEIGHTS, WEIGHTS, VAEConfig.from_json, AutoencoderKL,
                     VAEConfig.to_diffusers_dict),
}
# Each text encoder's tokenizer.
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclass(frozen=True)
class Options:
    """The choices of one conversion that planning needs."""

    dtype: str = "float16"
    vae_dtype: str | None = None
    variant: str | None = None
    revision: str | None = None
    allow_pickle: bool = False
    ema: bool = False
    unet_config: UNetConfig | None = None

    def dtype_of(self, name: str, config: Any) -> str:
        """The output dtype of pipeline model ``name``. SDXL's VAE overflows float16 (its config
        says ``force_upcast``), so it stays float32 unless asked or its config says it is safe."""
        if name != "vae":
            return self.dtype
        if self.vae_dtype is not None:
            return self.vae_dtype
        return "float32" if config.force_upcast else self.dtype


# ---------------------------------------------------------------------- plans


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


def _weight_candidates(kind: ModelKind, variant: str | None, prefer_fp16: bool):
    """(weights file, shard pattern if it is an index) in order of preference.

    Without ``variant``, the fp16 variant is preferred when converting to float16 (half the bytes
    to read, nothing lost) and the full-precision weights otherwise (bfloat16 from fp16 would be
    rounded twice); any safetensors file comes before any pickle.
    """
    variants = [variant] if variant else (["fp16", None] if prefer_fp16 else [None, "fp16"])
    for ext, stem in (("safetensors", kind.weights), ("bin", kind.pickle_weights)):
        for v in variants:
            tag = f".{v}" if v else ""
            yield f"{stem}{tag}.{ext}", None
            yield f"{stem}.{ext}.index{tag}.json", f"{stem}{tag}-*-of-*.{ext}"


def _weight_files(folder: Path, kind: ModelKind, variant: str | None, prefer_fp16: bool) -> list[Path]:
    """The weight files of a diffusers or transformers model folder: one file, or an index's shards."""
    for name, shard_pattern in _weight_candidates(kind, variant, prefer_fp16):
        path = folder / name
        if not path.is_file():
            continue
        if shard_pattern is None:
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise ConversionError(f"{path} is not a valid shard index (no weight_map).") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ConversionError(
                f"{folder} is missing {len(missing)} of the {len(shards)} shards listed in {name} "
                f"({', '.join(missing[:3])}); download them again."
            )
        return [folder / s for s in shards]
    stem = kind.weights
    wanted = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors (or .fp16.safetensors, sharded, .bin)"
    raise ConversionError(f"no {kind.what} weights in {folder}: expected {wanted}.")


def plan_model_folder(kind: ModelKind, folder: Path, dtype: str, options: Options, config: Any = None) -> Plan:
    """A diffusers (or transformers) model folder: names are kept, as the model's are theirs."""
    config = config or kind.parse_config(folder / "config.json")
    files = _weight_files(folder, kind, options.variant, dtype == "float16")
    source = _open_tensors(files, options.allow_pickle)
    names = {ours: Take(key) for ours, key in kind.names(source.shapes).items()}
    shown = files[0].name if len(files) == 1 else f"{len(files)} shards"
    return Plan(kind, config, source, names, f"diffusers folder {folder} ({shown})", dtype)


def _unet_folder(folder: Path) -> Path:
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet"  # a pipeline root
    if (folder / "config.json").is_file():
        return folder
    raise ConversionError(
        f"{folder} is not a diffusers model: expected unet/config.json (pipeline folder) or config.json (UNet folder)."
    )


def plan_unet_folder(folder: Path, options: Options) -> Plan:
    return plan_model_folder(UNET, _unet_folder(folder), options.dtype, options, options.unet_config)


def _single_file_unet(path: Path, source: TensorSource, options: Options) -> tuple[Plan, SingleFileUNet]:
    parsed = parse(source.shapes)
    config = options.unet_config
    notes = [f"using the given config instead of the inferred {parsed.family} one"] if config not in (None, parsed.config) else []
    names = parsed.names
    if options.ema:
        ema_names = {d: ema_name(k) for d, k in names.items()}
        present = sum(k in source.shapes for k in ema_names.values())
        if present == len(ema_names):
            names = ema_names
            notes.append("using the EMA weights")
        elif present == 0:
            notes.append("warning: --ema given but the file has no EMA weights; converting the regular weights")
        else:
            raise ConversionError(f"the file's EMA weights are incomplete ({present} of {len(ema_names)} tensors).")
    plan = Plan(UNET, config or parsed.config, source, {d: Take(k) for d, k in names.items()},
                f"{parsed.family} single-file checkpoint {path}", options.dtype, notes)
    return plan, parsed


def plan_unet_single_file(path: Path, source: TensorSource, options: Options) -> Plan:
    if describe_non_unet(list(source.shapes)) == "a UNet in diffusers' layout":
        # A lone diffusers weights file: its config sits beside it, or comes from --config.
        config = options.unet_config
        if config is None:
            if not (path.parent / "config.json").is_file():
                raise ConversionError(
                    f"{path} is a UNet in diffusers' layout without a config.json beside it; pass the folder, or --config."
                )
            config = UNetConfig.from_json(path.parent / "config.json")
        return Plan(UNET, config, source, {k: Take(k) for k in source.shapes}, f"diffusers weights {path}", options.dtype)
    plan, parsed = _single_file_unet(path, source, options)
    left = ", ".join(f"{what} ({n} tensors)" for what, n in parsed.ignored.items())
    if left:
        plan.notes.append(f"left alone: {left}")
    return plan


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"no {what} at {path}; download it again.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); download it again.") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} must hold a JSON object, got {type(raw).__name__}.")
    return raw


def _listed(index: dict[str, Any], name: str) -> str | None:
    """The class model_index.json gives component ``name``; None where it is absent or null."""
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def _tokenizer_files(folder: Path) -> dict[str, bytes]:
    """A tokenizer folder's files in the layout ``CLIPTokenizer.from_folder`` reads.

    Folders that transformers 4 saved (the published SDXL repos) are copied, after loading them
    once. transformers 5 saves only tokenizer.json and tokenizer_config.json: vocab.json and
    merges.txt are then written from tokenizer.json's BPE model, and its added tokens, with the
    flags that decide how prompts are split around them, become tokenizer_config.json's
    ``added_tokens_decoder``, where transformers 4.34+ keeps them.
    """
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        _check_tokenizer(folder, f"the tokenizer in {folder}")
        return {f: (folder / f).read_bytes() for f in TOKENIZER_FILES if (folder / f).is_file()}
    if not (folder / "tokenizer.json").is_file():
        raise ConversionError(
            f"{folder} holds no tokenizer (vocab.json and merges.txt, or tokenizer.json); download it again, or "
            "pass --tokenizers with an SDXL base folder or Hub repo id that has it."
        )
    fast = _read_json(folder / "tokenizer.json", "tokenizer")
    config = _read_json(folder / "tokenizer_config.json", "tokenizer config")
    model = fast.get("model")
    try:
        if model["type"] != "BPE" or not isinstance(model["vocab"], dict):
            raise TypeError
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        config["added_tokens_decoder"] = {
            str(t["id"]): {k: t[k] for k in _ADDED_TOKEN_FIELDS if k in t} for t in fast.get("added_tokens", [])
        }
    except (KeyError, TypeError):
        raise ConversionError(f"{folder / 'tokenizer.json'} does not hold a BPE tokenizer like CLIP's; download it again.") from None
    files = {
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False).encode(),
        "merges.txt": "\n".join(["#version: 0.2", *merges, ""]).encode(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False).encode(),
    }
    with tempfile.TemporaryDirectory() as written:
        for name, content in files.items():
            (Path(written) / name).write_bytes(content)
        _check_tokenizer(Path(written), f"the tokenizer written from {folder / 'tokenizer.json'}")
    return files


def _check_tokenizer(folder: Path, what: str) -> None:
    """Load it once, so that a tokenizer the pipeline could not load is refused now."""
    try:
        CLIPTokenizer.from_folder(folder)
    except ConfigError as e:
        raise ConversionError(f"{what} does not load: {e}") from None


def _tokenizers(root: Path, models: Iterable[str]) -> dict[str, dict[str, bytes]]:
    """Each text encoder's tokenizer files."""
    return {name: _tokenizer_files(root / name) for encoder, name in TOKENIZERS.items() if encoder in models}


def _output_index(index: dict[str, Any], written: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The source's model_index.json with the components not written set to null (diffusers'
    "absent"), and our format marker; and the names of those left out."""
    out, left = {}, []
    for key, value in index.items():
        if not key.startswith("_") and _listed(index, key) and key not in written:
            left.append(key)
            value = [None, None]
        out[key] = value
    out[FORMAT_KEY] = FORMAT_VERSION
    return out, left


def plan_pipeline_folder(folder: Path, options: Options, tokenizers: str | None = None) -> PipelinePlan:
    """A diffusers SDXL pipeline folder (base or refiner)."""
    index = _read_json(folder / MODEL_INDEX, "model_index.json")
    kind = index.get("_class_name", "diffusers")
    if not _listed(index, "text_encoder_2"):
        raise ConversionError(
            f"{folder} is a {kind} pipeline without text_encoder_2, not an SDXL one; only SDXL pipelines "
            "convert whole: pass --unet-only to convert its UNet."
        )
    for name in ("unet", "vae", "tokenizer_2", "scheduler"):
        if not _listed(index, name):
            raise ConversionError(f"{folder / MODEL_INDEX} lists no {name}; an SDXL pipeline needs one.")
    if bool(_listed(index, "text_encoder")) != bool(_listed(index, "tokenizer")):
        raise ConversionError(f"{folder / MODEL_INDEX} lists only one of text_encoder and tokenizer; it needs both or neither.")
    models = {}
    for name, model in MODELS.items():
        listed = _listed(index, name)
        if listed is None:
            continue
        if listed not in model.classes:
            raise ConversionError(
                f"{folder / MODEL_INDEX} says {name} is a {listed}; only {' or '.join(model.classes)} is supported there."
            )
        if not (folder / name / "config.json").is_file():
            raise ConversionError(f"{folder / name / 'config.json'} is missing ({MODEL_INDEX} lists {name}); download it again.")
        config = options.unet_config if name == "unet" and options.unet_config else model.parse_config(folder / name / "config.json")
        if name in TOKENIZERS and config.architecture not in model.classes:
            raise ConversionError(
                f"{folder / name / 'config.json'} describes a {config.architecture}; the {model.what} of SDXL is a "
                f"{model.classes[0]}."
            )
        models[name] = plan_model_folder(model, folder / name, options.dtype_of(name, config), options, config)
    for name in TOKENIZERS.values():
        listed = _listed(index, name)
        if listed is not None and listed not in TOKENIZER_CLASSES:
            raise ConversionError(f"{folder / MODEL_INDEX} says {name} is a {listed}; only a CLIPTokenizer is supported there.")
    copied = _tokenizers(fetch_tokenizers(tokenizers) if tokenizers else folder, models)
    scheduler = _read_json(folder / SCHEDULER_CONFIG, "scheduler config")
    model_index, left = _output_index(index, {*models, *copied, "scheduler"})
    notes = [f"left alone: {', '.join(left)}"] if left else []
    if tokenizers:
        notes.append(f"tokenizers from {tokenizers}")
    return PipelinePlan(models, copied, scheduler, model_index, f"diffusers pipeline {folder} ({kind})", notes)


def _sdxl_model_index(models: Iterable[str], refiner: bool) -> dict[str, Any]:
    """model_index.json as the published SDXL base and refiner repos have it."""
    classes = {name: ["diffusers" if name in ("unet", "vae") else "transformers", MODELS[name].classes[0]] for name in models}
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        # The base conditions an empty negative prompt on zeros; the refiner encodes it.
        "force_zeros_for_empty_prompt": not refiner,
        **({"requires_aesthetics_score": True} if refiner else {}),
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    for name, tokenizer in TOKENIZERS.items():
        index[name] = classes.get(name, [None, None])
        index[tokenizer] = ["transformers", "CLIPTokenizer"] if name in classes else [None, None]
    return {**index, "unet": classes["unet"], "vae": classes["vae"], FORMAT_KEY: FORMAT_VERSION}


def plan_pipeline_single_file(path: Path, source: TensorSource, options: Options,
                              tokenizers: str | None = None) -> PipelinePlan:
    """An original SDXL single file (sgm layout): every model, by the key tables."""
    unet, parsed = _single_file_unet(path, source, options)
    if not parsed.family.startswith("SDXL"):
        raise ConversionError(
            f"{path} is an {parsed.family} checkpoint; only SDXL checkpoints convert as a whole pipeline: "
            "pass --unet-only to convert its UNet."
        )
    if not tokenizers:
        raise ConversionError(
            f"{path} holds no tokenizer files; pass --tokenizers with an SDXL diffusers folder or Hub repo id "
            "(e.g. stabilityai/stable-diffusion-xl-base-1.0) to copy them from, or --unet-only to convert just the UNet."
        )
    found = {**parse_text_encoders(source.shapes), "vae": parse_vae(source.shapes)}
    if "text_encoder_2" not in found:
        raise ConversionError(
            f"{path} holds no OpenCLIP text encoder ({EMBEDDERS}N.model.*), so it is not a whole SDXL checkpoint; "
            "pass --unet-only to convert its UNet."
        )
    models = {"unet": unet}
    for name in MODELS:
        if name in found:
            part = found[name]
            models[name] = Plan(MODELS[name], part.config, source, part.names, f"{part.description} of {path}",
                                options.dtype_of(name, part.config))
    used = {take.key for plan in models.values() for take in plan.names.values()}
    left = sorted(set(source.shapes) - used)
    notes = [f"left alone: {len(left)} tensors ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''})"] if left else []
    notes.append(f"tokenizers from {tokenizers}; scheduler: SDXL's EulerDiscreteScheduler config")
    copied = _tokenizers(fetch_tokenizers(tokenizers), models)
    refiner = parsed.family.startswith("SDXL refiner")
    scheduler = {"_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULER_CONFIG}
    return PipelinePlan(models, copied, scheduler, _sdxl_model_index(models, refiner),
                        f"{parsed.family} single-file checkpoint {path}", notes)


def _check_widths(models: dict[str, Plan]) -> None:
    """The models must fit together: token states, pooled embedding and latents."""
    unet = models["unet"].config
    encoders = [models[n].config for n in TOKENIZERS if n in models]
    width = sum(c.hidden_size for c in encoders)
    if width != unet.cross_attention_dim:
        raise ConversionError(
            f"the text encoders give {' + '.join(str(c.hidden_size) for c in encoders)}-wide token states but the "
            f"UNet's cross-attention takes {unet.cross_attention_dim}; these models do not belong together."
        )
    if unet.has_text_time_embedding:
        pooled = encoders[-1].projection_dim if encoders[-1].with_projection else encoders[-1].hidden_size
        ids, remainder = divmod(unet.projection_class_embeddings_input_dim - pooled, unet.addition_time_embed_dim)
        if remainder or ids <= 0:
            raise ConversionError(
                f"the second text encoder's pooled embedding is {pooled} wide, which does not fit the UNet's added "
                f"embedding ({unet.projection_class_embeddings_input_dim} = pooled + time ids x "
                f"{unet.addition_time_embed_dim}); these models do not belong together."
            )
    vae = models["vae"].config
    if vae.latent_channels != unet.out_channels:
        raise ConversionError(
            f"the VAE has {vae.latent_channels} latent channels but the UNet predicts {unet.out_channels}; "
            "these models do not belong together."
        )


# ---------------------------------------------------------------------- the Hub


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def _snapshot(repo_id: str, revision: str | None, patterns: list[str] | None, offline: bool) -> Path:
    """``patterns`` of a repo downloaded (or, offline, the cached snapshot) as a local folder."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    if offline:
        try:
            return Path(huggingface_hub.snapshot_download(
                repo_id, revision=revision, local_files_only=True, allow_patterns=patterns))
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            raise ConversionError(
                f"HF_HUB_OFFLINE=1 and {repo_id} (revision {revision or 'main'}) is not in the Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}); run once online or unset HF_HUB_OFFLINE."
            ) from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise ConversionError(f"downloading {repo_id} failed ({type(e).__name__}: {e}).") from None


def _repo_files(repo_id: str, revision: str | None) -> set[str]:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return set(huggingface_hub.list_repo_files(repo_id, revision=revision))
    except RepositoryNotFoundError:
        raise ConversionError(f"{repo_id} is not a Hub repo you can access (check the name, or log in).") from None
    except Exception as e:  # HTTP errors, and whatever the HTTP client raises when offline
        raise ConversionError(
            f"could not list {repo_id} on the Hub ({type(e).__name__}: {e}); with a cached copy, set HF_HUB_OFFLINE=1."
        ) from None


def _choose_from_listing(kind: ModelKind, files: set[str], folder: str, variant: str | None, prefer_fp16: bool,
                         repo_id: str) -> list[str]:
    """Download patterns for the weights ``_weight_files`` would pick in ``folder`` of a repo listing."""
    prefix = f"{folder}/" if folder else ""
    available = {f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]}
    for name, shard_pattern in _weight_candidates(kind, variant, prefer_fp16):
        if name in available:
            return [prefix + name] if shard_pattern is None else [prefix + name, prefix + shard_pattern]
    raise ConversionError(f"{repo_id} has no {kind.what} weights in {folder or 'its root'} ({kind.weights}[.fp16].safetensors).")


def fetch_unet_from_hub(repo_id: str, options: Options, files: set[str] | None = None) -> Path:
    """Download (or, with HF_HUB_OFFLINE=1, find in the cache) only a repo's UNet config and weights."""
    prefer_fp16 = options.dtype == "float16"
    if _offline():
        patterns = ["config.json", f"{WEIGHTS}*", "unet/config.json", f"unet/{WEIGHTS}*"]
        folder = _snapshot(repo_id, options.revision, patterns, offline=True)
        try:
            unet = _unet_folder(folder)
            _weight_files(unet, UNET, options.variant, prefer_fp16)
        except ConversionError as e:
            raise ConversionError(f"HF_HUB_OFFLINE=1 and the cached snapshot of {repo_id} is incomplete: {e}") from None
        return unet
    files = _repo_files(repo_id, options.revision) if files is None else files
    sub = "unet" if "unet/config.json" in files else "" if "config.json" in files else None
    if sub is None:
        raise ConversionError(f"{repo_id} has no unet/config.json or config.json: not a diffusers UNet or pipeline.")
    config = f"{sub}/config.json" if sub else "config.json"
    chosen = _choose_from_listing(UNET, files, sub, options.variant, prefer_fp16, repo_id)
    return _snapshot(repo_id, options.revision, [config, *chosen], offline=False) / sub


def _small_files(names: Iterable[str]) -> list[str]:
    """A pipeline's configs and tokenizer files: what planning reads before any weights."""
    return [MODEL_INDEX, SCHEDULER_CONFIG, *(f"{n}/config.json" for n in names),
            *(f"{t}/{f}" for t in TOKENIZERS.values() for f in TOKENIZER_FILES)]


def fetch_pipeline_from_hub(repo_id: str, options: Options, files: set[str]) -> Path:
    """Download a pipeline's configs, tokenizer files and one weights variant per model.

    Two steps: the configs first, since the VAE's says which dtype, so which variant, it needs.
    """
    small = [f for f in _small_files(MODELS) if f in files]
    folder = _snapshot(repo_id, options.revision, small, offline=False)
    index = _read_json(folder / MODEL_INDEX, "model_index.json")
    weights = []
    for name, kind in MODELS.items():
        if _listed(index, name) and f"{name}/config.json" in files:  # planning names what is missing
            dtype = options.dtype_of(name, kind.parse_config(folder / name / "config.json"))
            weights += _choose_from_listing(kind, files, name, options.variant, dtype == "float16", repo_id)
    return _snapshot(repo_id, options.revision, weights, offline=False) if weights else folder


def fetch_tokenizers(spec: str) -> Path:
    """The folder that --tokenizers names: a local one, or the tokenizer files of a Hub repo."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not _is_repo_id(spec):
        raise ConversionError(f"--tokenizers {spec} is neither a folder nor a Hub repo id (owner/name).")
    names = [f"{t}/{f}" for t in TOKENIZERS.values() for f in TOKENIZER_FILES]
    if _offline():
        return _snapshot(spec, None, names, offline=True)
    files = _repo_files(spec, None)
    return _snapshot(spec, None, [f for f in names if f in files], offline=False)


# ---------------------------------------------------------------------- resolving a source


def _is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


def _refuse_overlap(out_dir: Path, source: str | Path, what: str) -> None:
    """Refuse an OUT_DIR that is ``source``, lies inside it or contains it: replacing OUT_DIR
    (with --force) or writing its partial folder there would delete or mix into the user's files."""
    out, src = out_dir.expanduser().resolve(), Path(source).expanduser().resolve()
    if out == src or out in src.parents or src in out.parents:
        relation = "is" if out == src else "contains" if out in src.parents else "is inside"
        raise ConversionError(f"OUT_DIR {out_dir} {relation} the {what} {source}; choose a folder outside it.")


def check_out_dir_apart(out_dir: Path, source: str, tokenizers: str | None) -> None:
    """Before anything is read or written: OUT_DIR overlaps neither a local source, a local
    --tokenizers folder, nor (for Hub ids) the Hugging Face cache the files are fetched into."""
    from huggingface_hub.constants import HF_HUB_CACHE

    for what, value in (("source", source), ("--tokenizers source", tokenizers)):
        if value is None:
            continue
        if Path(value).expanduser().exists():
            _refuse_overlap(out_dir, value, what)
        elif _is_repo_id(value):
            _refuse_overlap(out_dir, HF_HUB_CACHE, f"Hugging Face cache that {what} {value} is fetched into,")


def _local_source(source: str) -> Path | None:
    """``source`` as an existing path (None for a Hub repo id)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if _is_repo_id(source):
        return None
    raise ConversionError(f"{source} is neither a file, a folder nor a Hub repo id (owner/name).")


def _only_unet(plan: Plan) -> Plan:
    plan.notes.append("the source holds only a UNet: writing it alone (config.json + model.safetensors)")
    return plan


def _plan(source: str, options: Options, unet_only: bool, tokenizers: str | None) -> Plan | PipelinePlan:
    """What to write for ``source``: a UNet alone (a Plan) or a whole pipeline."""
    path = _local_source(source)
    if path is not None and path.is_file():
        tensors = _open_tensors([path], options.allow_pickle)
        if unet_only:
            return plan_unet_single_file(path, tensors, options)
        if not any(k.startswith(_OTHER_PARTS) for k in tensors.shapes):
            return _only_unet(plan_unet_single_file(path, tensors, options))
        return plan_pipeline_single_file(path, tensors, options, tokenizers)
    if path is not None:
        if unet_only:
            return plan_unet_folder(path, options)
        if not (path / MODEL_INDEX).is_file():
            return _only_unet(plan_unet_folder(path, options))
        return plan_pipeline_folder(path, options, tokenizers)

    if unet_only:
        plan = plan_unet_folder(fetch_unet_from_hub(source, options), options)
    elif _offline():
        folder = _snapshot(source, options.revision, None, offline=True)
        if not (folder / MODEL_INDEX).is_file():
            plan = _only_unet(plan_unet_folder(fetch_unet_from_hub(source, options), options))
        else:
            try:
                plan = plan_pipeline_folder(folder, options, tokenizers)
            except ConversionError as e:
                raise ConversionError(f"HF_HUB_OFFLINE=1 and the cached snapshot of {source} is incomplete: {e}") from None
    else:
        files = _repo_files(source, options.revision)
        if MODEL_INDEX in files:
            plan = plan_pipeline_folder(fetch_pipeline_from_hub(source, options, files), options, tokenizers)
        else:
            plan = _only_unet(plan_unet_folder(fetch_unet_from_hub(source, options, files), options))
    plan.description = f"Hub repo {source}" + (f"@{options.revision}" if options.revision else "")
    if isinstance(plan, PipelinePlan):
        plan.description += f" ({plan.model_index.get('_class_name', 'diffusers')})"
    return plan


# ---------------------------------------------------------------------- writing


class _Progress:
    """One line, redrawn in place on a terminal; every 10% as a new line otherwise."""

    def __init__(self, total: int, enabled: bool, stream=sys.stderr):
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
    config: UNetConfig
    tensors: int
    bytes: int
    nonfinite: list[str]
    notes: list[str]
    configs: dict[str, Any] = field(default_factory=dict)  # every model written, by component name
    dtypes: dict[str, str] = field(default_factory=dict)


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    old = None
    try:
        write(partial)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary folder
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.rename(out_dir, old / "previous")
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not out_dir.exists():
            os.rename(old / "previous", out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _checked_shapes(plan: Plan) -> dict[str, tuple[int, ...]]:
    """The model's parameter shapes, after checking the plan supplies exactly them."""
    expected = model_shapes(plan.kind.build(plan.config))  # shapes only: nothing is allocated
    given = {d: torch_to_mlx_shape(take.shape(plan.source.shapes[take.key])) for d, take in plan.names.items()}
    try:
        check_shapes(expected, given, plan.kind.what)
    except WeightsError as e:
        raise WeightsError(f"{plan.description}: {e}") from None
    return expected


def _specs(plan: Plan, expected: dict[str, tuple[int, ...]], nonfinite: list[str], label: str) -> list[TensorSpec]:
    target = DTYPES[plan.dtype]

    def produce(name: str) -> Callable[[], mx.array]:
        def read() -> mx.array:
            take = plan.names[name]
            array = torch_to_mlx_layout(take.apply(plan.source.read(take.key))).astype(target)
            if not bool(mx.all(mx.isfinite(array))):
                nonfinite.append(label + name)
            return array

        return read

    return [TensorSpec(n, expected[n], target, produce(n)) for n in sorted(plan.names)]


def _write_pipeline_files(folder: Path, pipeline: PipelinePlan) -> None:
    for name, files in pipeline.tokenizers.items():
        (folder / name).mkdir()
        for file, content in files.items():
            (folder / name / file).write_bytes(content)
    (folder / "scheduler").mkdir()
    (folder / SCHEDULER_CONFIG).write_text(json.dumps(pipeline.scheduler, indent=2) + "\n")
    (folder / MODEL_INDEX).write_text(json.dumps(pipeline.model_index, indent=2) + "\n")


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
) -> ConversionResult:
    """Convert an SDXL pipeline (or, with ``unet_only``, a UNet) to an MLX folder.

    ``source``: a Hub repo id, a diffusers folder, or an original single-file checkpoint. A source
    that holds only a UNet is written as with ``unet_only`` (``UNet2DConditionModel.from_pretrained``
    loads it).
    ``dtype``: the UNet's and text encoders'; ``vae_dtype``: the VAE's (default float32, or
    ``dtype`` when its config says ``force_upcast: false``).
    ``config``: a diffusers UNet config.json (or folder) to use instead of the source's or the inferred one.
    ``tokenizers``: a diffusers SDXL folder or Hub repo id to copy the tokenizers from (needed for single files).
    Raises an ``MlxUnetError`` for unusable input; nothing is written then.
    """
    for name, value in (("dtype", dtype), ("vae_dtype", vae_dtype)):
        if value is not None and value not in DTYPES:
            raise ConversionError(f"{name} {value!r} is not one of {', '.join(DTYPES)}.")
    if unet_only and (vae_dtype or tokenizers):
        raise ConversionError("--vae-dtype and --tokenizers are for whole pipelines; drop them with --unet-only.")
    out_dir = Path(out_dir)
    tokenizers = None if tokenizers is None else str(tokenizers)
    # Before any download or reading.
    check_out_dir_apart(out_dir, str(source), tokenizers)
    _check_out_dir(out_dir, force)
    override = UNetConfig.from_json(config) if config is not None else None
    options = Options(dtype, vae_dtype, variant, revision, allow_pickle, ema, override)
    planned = _plan(str(source), options, unet_only, tokenizers)
    pipeline = planned if isinstance(planned, PipelinePlan) else None
    layout = pipeline.models if pipeline else {"": planned}  # output subfolder -> model

    expected = {sub: _checked_shapes(plan) for sub, plan in layout.items()}
    if pipeline:
        _check_widths(pipeline.models)

    notes = (pipeline.notes if pipeline else []) + [n for plan in layout.values() for n in plan.notes]
    log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if pipeline:
        log(f"source: {pipeline.description}")
        for sub, plan in layout.items():
            log(f"  {sub}: {plan.description}, {len(plan.names)} tensors -> {plan.dtype}")
    else:
        log(f"source: {planned.description}, {len(planned.names)} UNet tensors")
    for note in notes:
        log(f"  {note}")

    nonfinite: list[str] = []
    specs = {sub: _specs(plan, expected[sub], nonfinite, f"{sub}/" if sub else "") for sub, plan in layout.items()}
    total = sum(spec.nbytes for group in specs.values() for spec in group)
    show = _Progress(total, progress)

    def write(folder: Path) -> None:
        if pipeline:
            _write_pipeline_files(folder, pipeline)
        for sub, plan in layout.items():
            (folder / sub).mkdir(exist_ok=True)
            metadata = {"format": "mlx", "mlx_unet_format_version": FORMAT_VERSION, "source": plan.description,
                        "dtype": plan.dtype}
            write_safetensors(folder / sub / OUTPUT_WEIGHTS, specs[sub], metadata, on_tensor=lambda spec: show(spec.nbytes))
            (folder / sub / "config.json").write_text(json.dumps(plan.kind.config_dict(plan.config), indent=2) + "\n")

    _replace_dir_atomically(out_dir, write, force)
    if nonfinite:
        shown = ", ".join(nonfinite[:5]) + (f", ... ({len(nonfinite) - 5} more)" if len(nonfinite) > 5 else "")
        log(f"warning: {len(nonfinite)} tensors hold NaN or inf values after conversion to {dtype} ({shown}); "
            "the model will likely produce NaN.")
    dtypes = {sub or "unet": plan.dtype for sub, plan in layout.items()}
    log(f"wrote {out_dir} ({total / 1e9:.2f} GB, {', '.join(sorted(set(dtypes.values())))})")
    configs = {sub or "unet": plan.config for sub, plan in layout.items()}
    return ConversionResult(out_dir, configs["unet"], sum(len(g) for g in specs.values()), total, nonfinite, notes,
                            configs, dtypes)


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a Stable Diffusion XL checkpoint to an MLX model folder. By default the whole "
        "pipeline: unet/, text_encoder/ (not in a refiner), text_encoder_2/, vae/ (each config.json + "
        "model.safetensors), tokenizer/, tokenizer_2/, scheduler/ and model_index.json, for "
        "mlx_unet.text_to_image. With --unet-only, the UNet alone (config.json + model.safetensors) of any "
        "SD 1.x, 2.x or XL checkpoint, for mlx_unet.UNet2DConditionModel.from_pretrained; a source that holds "
        "only a UNet is converted so too.",
        epilog="SOURCE is a Hub repo id (stabilityai/stable-diffusion-xl-base-1.0), a diffusers folder "
        "(a pipeline root, or a UNet folder), or an original single-file checkpoint (sd_xl_base_1.0.safetensors, "
        "sd_xl_refiner_1.0.safetensors; these hold no tokenizers: pass --tokenizers). "
        "Set HF_HUB_OFFLINE=1 to use only the Hugging Face cache.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.add_argument("--dtype", choices=list(DTYPES), default="float16",
                   help="output dtype of the UNet and text encoders (default: float16)")
    p.add_argument("--vae-dtype", choices=list(DTYPES),
                   help="output dtype of the VAE (default: float32, since SDXL's VAE overflows float16; the "
                   "--dtype value when the VAE's config says force_upcast: false, as the fp16-fix VAE's does)")
    p.add_argument("--unet-only", action="store_true",
                   help="convert only the UNet, into OUT_DIR/config.json + OUT_DIR/model.safetensors")
    p.add_argument("--tokenizers", metavar="SOURCE",
                   help="an SDXL diffusers folder or Hub repo id to copy tokenizer/ and tokenizer_2/ from "
                   "(needed for single files; default: the SOURCE pipeline's own)")
    p.add_argument("--variant", help="diffusers weights variant to read, e.g. fp16 (default: fp16 for a "
                   "float16 output when the source has it)")
    p.add_argument("--revision", help="Hub branch, tag or commit of SOURCE (default: main)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--ema", action="store_true", help="single files: use the UNet's EMA weights when the file has them")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .ckpt/.bin/.pt pickles (loaded with torch.load(weights_only=True); needs torch)")
    p.add_argument("--config", type=Path, help="a diffusers UNet config.json to use instead of the source's or the inferred one")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(args.source, args.out_dir, dtype=args.dtype, variant=args.variant, revision=args.revision,
                force=args.force, ema=args.ema, allow_pickle=args.allow_pickle, config=args.config,
                progress=not args.quiet, unet_only=args.unet_only, vae_dtype=args.vae_dtype,
                tokenizers=args.tokenizers)
    except MlxUnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e} ({e.filename or ''})".replace(" ()", ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0
