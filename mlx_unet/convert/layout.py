"""What a diffusers pipeline folder holds and where: the kinds of model, their weight files,
model_index.json; and the choices of one conversion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import mlx.nn as nn

from .. import jsonfile
from ..configs.clip import CLIPTextConfig
from ..configs.unet import UNetConfig
from ..configs.vae import TinyVAEConfig, VAEConfig
from ..errors import ConversionError
from ..models.clip import CLIPTextModel
from ..models.unet import UNet2DConditionModel
from ..models.tiny_vae import AutoencoderTiny
from ..models.vae import AutoencoderKL
from ..naming.clip import checkpoint_names

WEIGHTS = "diffusion_pytorch_model"
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# Each text encoder's tokenizer.
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def _same_names(keys: Iterable[str]) -> dict[str, str]:
    return {k: k for k in keys}


def _text_encoder_names(keys: Iterable[str]) -> dict[str, str]:
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
    alone: str | None = None  # its name in a ConversionResult where a source holds this model alone


UNET = ModelKind("UNet", ("UNet2DConditionModel",), WEIGHTS, WEIGHTS, UNetConfig.from_json, UNet2DConditionModel,
                 UNetConfig.to_dict, alone="unet")
# TAESD / TAESDXL: a model of its own beside a pipeline, never a part of one.
TINY_VAE = ModelKind("tiny VAE", ("AutoencoderTiny",), WEIGHTS, WEIGHTS, TinyVAEConfig.from_json, AutoencoderTiny,
                     TinyVAEConfig.to_dict, alone="tiny_vae")
MODELS: dict[str, ModelKind] = {
    "unet": UNET,
    "text_encoder": ModelKind("text encoder", ("CLIPTextModel",), "model", "pytorch_model", CLIPTextConfig.from_json,
                              CLIPTextModel, CLIPTextConfig.to_dict, _text_encoder_names),
    "text_encoder_2": ModelKind("second text encoder", ("CLIPTextModelWithProjection",), "model", "pytorch_model",
                                CLIPTextConfig.from_json, CLIPTextModel, CLIPTextConfig.to_dict,
                                _text_encoder_names),
    "vae": ModelKind("VAE", ("AutoencoderKL",), WEIGHTS, WEIGHTS, VAEConfig.from_json, AutoencoderKL,
                     VAEConfig.to_dict),
}


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
    prediction_type: str | None = None  # the scheduler config's, replaced; None: the source's (or family's)

    def dtype_of(self, name: str, config: Any) -> str:
        """The output dtype of pipeline model ``name``. SDXL's VAE overflows float16 (its config
        says ``force_upcast``, as SD 1.x / 2.x ones do by diffusers' default), so it stays float32
        unless asked or its config says it is safe."""
        if name != "vae":
            return self.dtype
        if self.vae_dtype is not None:
            return self.vae_dtype
        return "float32" if config.force_upcast else self.dtype


def weight_candidates(kind: ModelKind, variant: str | None, prefer_fp16: bool) -> Iterator[tuple[str, str | None]]:
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


def weight_files(folder: Path, kind: ModelKind, variant: str | None, prefer_fp16: bool) -> list[Path]:
    """The weight files of a diffusers or transformers model folder: one file, or an index's shards."""
    for name, shard_pattern in weight_candidates(kind, variant, prefer_fp16):
        path = folder / name
        if not path.exists():  # a folder in a weights file's place is refused by its reader, not skipped
            continue
        if shard_pattern is None:
            return [path]
        shards = _shards(path)
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


def _shards(index: Path) -> list[str]:
    """The shard file names a ``*.safetensors.index.json`` lists."""
    weight_map = read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(s, str) for s in weight_map.values()):
        raise ConversionError(f"{index} is not a valid shard index (no weight_map of tensor names to files); "
                              "download it again.")
    # A shard is a file beside its index: a path elsewhere would read a file the folder does not hold.
    outside = sorted(s for s in set(weight_map.values()) if Path(s).name != s or s in ("", ".", ".."))
    if outside:
        raise ConversionError(f"{index} lists shard {outside[0]!r}, which is not a file name in its folder; "
                              "download it again.")
    return sorted(set(weight_map.values()))


def unet_folder(folder: Path) -> Path:
    """The UNet's folder of a pipeline root or of a UNet folder."""
    # exists(), not is_file(): a folder named config.json is then refused as such by the config reader.
    if (folder / "unet" / "config.json").exists():
        return folder / "unet"
    if (folder / "config.json").exists():
        return folder
    raise ConversionError(
        f"{folder} is not a diffusers model: expected unet/config.json (pipeline folder) or config.json (UNet folder)."
    )


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object of the source being converted (``jsonfile.read_json``, as a ConversionError)."""
    return jsonfile.read_json(path, what, ConversionError)


def listed(index: dict[str, Any], name: str) -> str | None:
    """The class model_index.json gives component ``name``; None where it is absent or null."""
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None
