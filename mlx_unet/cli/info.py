"""What a checkpoint or folder is, without converting it or loading its weights.

    mlx-unet info sd_xl_base_1.0.safetensors      (--json: one JSON object)

MODEL is a folder `mlx-unet convert` wrote (a pipeline, or a UNet alone), a diffusers folder (a
pipeline or a UNet), an original single file (.safetensors), or a Hub repo id found in the Hugging
Face cache (nothing is downloaded). Read are the configs (or, for a single file, the tensor names
and shapes its header lists, as the converter infers a config from them) and the weights files'
headers: the family, each part's parameters, size, dtype and quantization, the prediction type,
and which parts a LoRA applies to (fused or live; live only where the part is quantized, since
fusing would round the LoRA away).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .. import jsonfile
from ..configs.base import DTYPES, FORMAT_KEY, SECTION
from ..configs.families import text_encoder_family, unet_family
from ..configs.quantization import Quantization, read_quantization
from ..configs.unet import UNetConfig
from ..convert.infer import infer_unet
from ..convert.layout import MODEL_INDEX, MODELS, SCHEDULER_CONFIG, listed, weight_files
from ..convert.published import published
from ..convert.single_file import describe_non_unet
from ..convert.sources import PICKLE_SUFFIXES
from ..errors import ConversionError, InputError
from ..linked import has_links, read_links
from ..model_source import locate
from ..naming.clip import LDM_TEXT_PREFIX
from ..naming.ldm_unet import UNET_PREFIX
from ..naming.ldm_vae import VAE_PREFIX
from ..pipelines.model_sizes import text_encoder_parameters, unet_parameters, vae_parameters
from ..safetensors_io import SafetensorsReader
from .common import ArgumentParser, run_command

LORA_PARTS = ("unet", "text_encoder", "text_encoder_2")  # what LoRA files target (naming.lora); never the VAE
_PARAMETERS = {"unet": unet_parameters, "text_encoder": text_encoder_parameters,
               "text_encoder_2": text_encoder_parameters, "vae": vae_parameters}
# safetensors dtype -> ours; the integer ones are a quantized layer's packed weights and exponents.
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_EMBEDDER = re.compile(r"conditioner\.embedders\.\d+\.")
# OpenCLIP's training temperature, kept in its checkpoints: no parameter of the text encoder (the
# converter leaves it alone too).
_NOT_PARAMETERS = ("logit_scale",)


@dataclass
class Part:
    """One model of a pipeline, as stored."""

    what: str  # its family: "SDXL base (6 time ids)", "CLIP ViT-L (...)", "VAE"
    parameters: int
    bytes: int | None  # of its weights; None where they are not on this machine
    dtypes: list[str]  # the floating dtypes its weights are stored in
    quantization: Quantization | None = None
    linked: bool = False  # read from its source where it lies (``mlx_unet.linked``), not a copy


def lora_mode(name: str, part: Part) -> str | None:
    """How a LoRA applies to part ``name``: fused or live; live only where it is quantized (fusing
    would round the LoRA away); None for the VAE, which LoRA files do not target."""
    if name not in LORA_PARTS:
        return None
    return "live only (quantized)" if part.quantization else "fused or live"


@dataclass
class ModelInfo:
    source: str
    kind: str  # "converted pipeline", "diffusers UNet", "original single file", ...
    family: str
    prediction_type: str | None  # None: not known
    prediction_note: str  # where the prediction type comes from
    parts: dict[str, Part]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name, part in self.parts.items():
            data["parts"][name]["lora"] = lora_mode(name, part)
        return data


# ---------------------------------------------------------------------- headers


def _weights(files: Sequence[Path]) -> tuple[int, list[str]]:
    """Bytes and floating dtypes of weights files, from their headers (pickles: bytes only)."""
    total, dtypes = 0, set()
    for file in files:
        if file.suffix.lower() in PICKLE_SUFFIXES:
            total += file.stat().st_size
            continue
        for tensor in SafetensorsReader(file).tensors.values():
            total += tensor.end - tensor.begin
            dtypes.add(_FLOAT_DTYPES.get(tensor.dtype))
    return total, sorted(d for d in dtypes if d)


def _linked_weights(folder: Path) -> tuple[int, list[str]]:
    """A linked model's bytes and dtype as it loads (``mlx_unet.linked``), from its sources' headers."""
    links, dtype = read_links(folder)
    size = DTYPES[dtype].size
    return sum(math.prod(take.shape(reader.tensors[take.key].shape)) * size for reader, take in links.values()), [dtype]


def _what(name: str, config: Any) -> str:
    if name == "unet":
        return unet_family(config)
    if name == "vae":
        return f"VAE ({config.latent_channels} latent channels)"
    return text_encoder_family(config.hidden_size)


# ---------------------------------------------------------------------- folders


def _prediction(folder: Path) -> tuple[str | None, str]:
    path = folder / SCHEDULER_CONFIG
    if not path.is_file():
        return None, "no scheduler config"
    scheduler = jsonfile.read_json(path, "scheduler config", InputError)
    if "prediction_type" in scheduler:
        return scheduler["prediction_type"], "the scheduler config's"
    return "epsilon", "diffusers' default; the scheduler config names none"


def _folder_part(name: str, folder: Path, converted: bool) -> Part:
    kind = MODELS[name]
    config = kind.parse_config(folder / "config.json")
    quantization = read_quantization(folder, name) if converted else None
    try:
        if converted and has_links(folder):
            return Part(_what(name, config), _PARAMETERS[name](config), *_linked_weights(folder), quantization, True)
        files = sorted(folder.glob("*.safetensors")) if converted else weight_files(folder, kind, None, False)
        size, dtypes = _weights(files) if files else (None, [])
    except ConversionError:  # a Hub snapshot holds only what was downloaded
        size, dtypes = None, []
    return Part(_what(name, config), _PARAMETERS[name](config), size, dtypes, quantization)


def _describe_folder(source: str, folder: Path, origin: str = "") -> ModelInfo:
    """A converted or diffusers folder: a pipeline (model_index.json) or a UNet alone; ``origin``
    is added to its kind."""
    index_path = folder / MODEL_INDEX
    if index_path.is_file():
        index = jsonfile.read_json(index_path, MODEL_INDEX, InputError)
        converted = FORMAT_KEY in index
        parts = {name: _folder_part(name, folder / name, converted) for name in MODELS if listed(index, name)}
        if "unet" not in parts:
            raise InputError(f"{folder} lists no unet in {MODEL_INDEX}; it is not a Stable Diffusion pipeline.")
        what = f"{'converted' if converted else 'diffusers'} pipeline ({index.get('_class_name', 'no class name')})"
        prediction = _prediction(folder)
    else:
        unet = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
        converted = SECTION in jsonfile.read_json(unet / "config.json", "UNet config", InputError)
        parts = {"unet": _folder_part("unet", unet, converted)}
        what = f"{'converted' if converted else 'diffusers'} UNet alone"
        prediction = _prediction(folder) if unet != folder else (None, "a UNet alone has no scheduler config")
    return ModelInfo(source, what + origin, parts["unet"].what, *prediction, parts)


# ---------------------------------------------------------------------- single files


def _single_file_parts(reader: SafetensorsReader) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The file's parameters grouped by part (the diffusers name), and the names of the tensors of
    no part (the noise schedule, EMA weights and counters, ...)."""
    groups: dict[str, dict[str, Any]] = {}
    left = []
    for key, tensor in reader.tensors.items():
        embedder = _EMBEDDER.match(key)
        if key.endswith(_NOT_PARAMETERS) or tensor.dtype not in _FLOAT_DTYPES:  # (CLIP's position ids: a buffer)
            part = None
        elif key.startswith(UNET_PREFIX):
            part = "unet"
        elif key.startswith(VAE_PREFIX):
            part = "vae"
        elif embedder:  # SDXL: OpenCLIP ViT-bigG (model.*) is the second encoder, CLIP ViT-L the first
            part = "text_encoder_2" if key[embedder.end():].startswith("model.") else "text_encoder"
        else:
            part = "text_encoder" if key.startswith(LDM_TEXT_PREFIX) else None
        if part is None:
            left.append(key)
        else:
            groups.setdefault(part, {})[key] = tensor
    return groups, left


def _describe_single_file(source: str, path: Path) -> ModelInfo:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(f"{path} is a PyTorch pickle, which cannot be read without running it; info reads "
                         ".safetensors files: convert it (mlx-unet convert --allow-pickle) and describe the result.")
    reader = SafetensorsReader(path)
    groups, left = _single_file_parts(reader)
    if "unet" not in groups:
        what = describe_non_unet(list(reader.tensors)) or "no Stable Diffusion UNet"
        hint = "; pass its folder" if what == "a UNet in diffusers' layout" else ""
        raise InputError(f"{path} holds {what}, not a Stable Diffusion checkpoint (model.diffusion_model.*){hint}.")
    try:
        unet: UNetConfig | None = infer_unet({k[len(UNET_PREFIX):]: t.shape for k, t in groups["unet"].items()})
        family = unet_family(unet)
    except ConversionError as e:
        unet, family = None, f"not supported ({e})"
    parts = {}
    for name in MODELS:
        if name in groups:
            tensors = groups[name].values()
            count = sum(math.prod(t.shape) for t in tensors)
            dtypes = sorted({_FLOAT_DTYPES[t.dtype] for t in tensors})
            what = family if name == "unet" else _part_family(name, groups[name])
            parts[name] = Part(what, count, sum(t.end - t.begin for t in tensors), dtypes)
    family_pipeline = published(unet) if unet is not None else None
    if family_pipeline is None:
        prediction: tuple[str | None, str] = (None, "not recorded in the file")
    else:
        prediction = (family_pipeline.prediction_type,
                      f"the file does not record it; {family_pipeline.repo}'s, as for the conversion")
    notes = [f"not converted: {len(left)} tensors ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''})"] \
        if left else []
    return ModelInfo(source, "original single file", family, *prediction, parts, notes)


def _part_family(name: str, tensors: dict[str, Any]) -> str:
    """A single file's VAE or text encoder, by the width its tensors show."""
    if name == "vae":
        latents = tensors.get(VAE_PREFIX + "decoder.conv_in.weight")
        return "VAE" if latents is None else f"VAE ({latents.shape[1]} latent channels)"
    embedding = next((t for k, t in tensors.items() if k.endswith("token_embedding.weight")), None)
    return "a text encoder" if embedding is None else text_encoder_family(embedding.shape[1])


# ---------------------------------------------------------------------- the Hub


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The repo's snapshot in the Hugging Face cache; nothing is downloaded."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        raise InputError(f"{repo_id} (revision {revision or 'main'}) is not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}), and info reads only what is on this machine; download or "
                         "convert it first.") from None


def describe(source: str | Path, revision: str | None = None) -> ModelInfo:
    """What ``source`` (a folder, a single file or a cached Hub repo id) is, from its small files
    and headers alone; an ``MlxUnetError`` (one sentence) for anything else."""
    found = locate(source)
    if found.kind == "file":
        return _describe_single_file(found.text, found.path)
    if found.kind == "hub":
        folder = _hub_snapshot(found.text, revision)
        return _describe_folder(found.text, folder, f", Hub repo in the Hugging Face cache (commit {folder.name})")
    return _describe_folder(found.text, found.path)


# ---------------------------------------------------------------------- output


def _scaled(n: float, unit: str, prefixes: tuple[str, str, str] = ("G", "M", "k")) -> str:
    """``n`` of ``unit`` in thousands, millions or billions of it: "5.14 GB", "123.1 million parameters"."""
    for scale, prefix in zip((1e9, 1e6, 1e3), prefixes):
        if n >= scale:
            return f"{n / scale:.{2 if scale == 1e9 else 1}f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def _storage(part: Part) -> str:
    """Size, dtype and quantization of the stored weights: "1.53 GB float16, 4-bit affine, groups of 64"."""
    if part.bytes is None:
        return "weights not here"
    quantized = f", {part.quantization.describe()}" if part.quantization else ""
    linked = ", linked to its source" if part.linked else ""
    return f"{_scaled(part.bytes, 'B')} {', '.join(part.dtypes) or 'dtype unknown'}{quantized}{linked}"


def format_info(info: ModelInfo) -> str:
    """A few aligned lines: the model, then one line per part."""
    prediction = f"{info.prediction_type or 'unknown'} ({info.prediction_note})"
    head = [("model", info.source), ("kind", info.kind), ("family", info.family), ("prediction", prediction)]
    rows = [[name, _scaled(p.parameters, "parameters", ("billion ", "million ", "thousand ")), _storage(p),
             f"LoRA: {lora_mode(name, p)}" if lora_mode(name, p) else "no LoRA", p.what if name != "unet" else ""]
            for name, p in info.parts.items()]
    width = max(len(key) for key in [*(k for k, _ in head), *info.parts]) + 2
    columns = [max(len(r[i]) for r in rows) for i in range(1, 4)]
    lines = [f"{key:{width}s}{value}" for key, value in head]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[1:4], columns)] + [row[4]]
        lines.append((row[0].ljust(width) + "  ".join(cells)).rstrip())
    return "\n".join(lines + [f"{'note':{width}s}{note}" for note in info.notes])


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx-unet info", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="a converted or diffusers folder, a .safetensors single file, or a cached Hub repo id")
    p.add_argument("--revision", help="Hub branch, tag or commit of MODEL in the cache (default: main)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the aligned lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        info = describe(args.model, args.revision)
        print(json.dumps(info.to_json(), indent=2) if args.json else format_info(info))
        return 0

    return run_command(run, lambda: "nothing was changed")
