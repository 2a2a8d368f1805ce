"""Original single files (ldm / sgm layout): each part's config inferred from its tensors, then
its parameters named through that config's table in ``mlx_unet.naming``.

Stability's checkpoints (``sd_xl_base_1.0.safetensors``, SD 1.x/2.x files, and the community
fine-tunes that share their layout) hold the UNet as ``model.diffusion_model.*``; the SDXL ones
hold the whole pipeline, text encoders as ``conditioner.embedders.N.*`` and the VAE as
``first_stage_model.*``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..configs.base import FORMAT_KEY, FORMAT_VERSION
from ..configs.families import unet_family
from ..configs.unet import UNetConfig
from ..errors import ConversionError
from ..naming import NameTable, Take
from ..naming.clip import CLIPNames, OpenCLIPNames, checkpoint_names
from ..naming.ldm_unet import UNET_PREFIX, UNetNames, ema_name
from ..naming.ldm_vae import VAE_PREFIX, VAENames
from ..schedulers import SDXL_SCHEDULER_CONFIG
from .hub import fetch_tokenizers
from .infer import infer_clip, infer_open_clip, infer_unet, infer_vae, unfit
from .layout import MODELS, TOKENIZERS, UNET, Options
from .plan import PipelinePlan, Plan
from .sources import TensorSource
from .tokenizer_files import pipeline_tokenizers

EMBEDDERS = "conditioner.embedders."
# The parts of a full checkpoint besides the UNet, and what they are.
_COMPONENTS = {
    VAE_PREFIX: "VAE",
    "cond_stage_model.": "text encoder",
    EMBEDDERS: "text encoders",
    "model_ema.": "EMA weights",
}


def _under(shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def holds_more_than_a_unet(keys: Iterable[str]) -> bool:
    return any(k.startswith((VAE_PREFIX, EMBEDDERS, "cond_stage_model.")) for k in keys)


def describe_non_unet(keys: list[str]) -> str | None:
    """What a file without UNet tensors seems to be, for the error message."""
    joined = " ".join(keys[:2000])
    if re.search(r"(^| )(first_stage_model\.)?(encoder|decoder)\.(down|up|mid|conv_in)", joined) or "quant_conv" in joined:
        return "a VAE"
    if re.search(r"text_model\.|transformer\.resblocks\.|token_embedding|cond_stage_model\.|conditioner\.embedders", joined):
        return "a text encoder"
    if "down_blocks.0.resnets.0.conv1.weight" in keys and "conv_in.weight" in keys:
        return "a UNet in diffusers' layout"
    return None


def _named(table: NameTable, shapes, what: str) -> dict[str, Take]:
    names, unmapped = table.names(shapes)
    if unmapped:
        raise unfit(what, (k.removeprefix(table.prefix) for k in unmapped))
    return names


def _ignored(keys: Iterable[str]) -> dict[str, int]:
    """Tensor counts of the parts other than the UNet, in the order of ``_COMPONENTS``."""
    counts: dict[str, int] = defaultdict(int)
    for key in keys:
        if not key.startswith(UNET_PREFIX):
            counts[next((what for p, what in _COMPONENTS.items() if key.startswith(p)), "other")] += 1
    order = [*_COMPONENTS.values(), "other"]
    return dict(sorted(counts.items(), key=lambda kv: order.index(kv[0])))


def _ema(names: dict[str, Take], shapes, notes: list[str]) -> dict[str, Take]:
    ema_names = {d: Take(ema_name(take.key)) for d, take in names.items()}
    present = sum(take.key in shapes for take in ema_names.values())
    if present == len(ema_names):
        notes.append("using the EMA weights")
        return ema_names
    if present == 0:
        notes.append("warning: --ema given but the file has no EMA weights; converting the regular weights")
        return names
    raise ConversionError(f"the file's EMA weights are incomplete ({present} of {len(ema_names)} tensors).")


def _unet(path: Path, source: TensorSource, options: Options) -> tuple[Plan, str]:
    """The UNet's plan, and its family's name."""
    shapes = _under(source.shapes, UNET_PREFIX)
    if not shapes:
        what = describe_non_unet(list(source.shapes))
        if what:
            raise ConversionError(f"this file holds {what}, not a UNet; pass a UNet or full Stable Diffusion checkpoint.")
        first = ", ".join(list(source.shapes)[:3])
        raise ConversionError(
            f"no UNet tensors ({UNET_PREFIX}*) in this file, so its architecture is unknown (first keys: {first})."
        )
    notes = []
    config = options.unet_config
    if config is None:
        config = infer_unet(shapes)
    else:
        # The given config names the tensors, so a file whose config cannot be inferred converts too.
        try:
            inferred = infer_unet(shapes)
        except ConversionError:
            notes.append("using the given config (the file's own cannot be inferred)")
        else:
            if inferred != config:
                notes.append(f"using the given config instead of the inferred {unet_family(inferred)} one")
    names = _named(UNetNames(config), source.shapes, "UNet")
    if options.ema:
        names = _ema(names, source.shapes, notes)
    family = unet_family(config)
    return Plan(UNET, config, source, names, f"{family} single-file checkpoint {path}", options.dtype, notes), family


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
    plan, _ = _unet(path, source, options)
    left = ", ".join(f"{what} ({n} tensors)" for what, n in _ignored(source.shapes).items())
    if left:
        plan.notes.append(f"left alone: {left}")
    return plan


@dataclass
class _Part:
    """A text encoder or the VAE of a single file: its inferred config, each parameter's source."""

    config: Any
    names: dict[str, Take]
    description: str


def _text_encoders(shapes) -> dict[str, _Part]:
    """``text_encoder`` (CLIP ViT-L, the base only) and ``text_encoder_2`` (OpenCLIP ViT-bigG) of
    an sgm checkpoint, told apart by layout rather than by embedder number."""
    found: dict[str, _Part] = {}
    for n in sorted({int(m[1]) for k in shapes if (m := re.match(re.escape(EMBEDDERS) + r"(\d+)\.", k))}):
        embedder = f"{EMBEDDERS}{n}."
        keys = [embedder + k for k in _under(shapes, embedder)]
        if any(k.startswith(embedder + "transformer.text_model.") for k in keys):
            slot, what, prefix = "text_encoder", "CLIP text encoder", embedder + "transformer."
            config = infer_clip(checkpoint_names(_under(shapes, prefix)))
            table: NameTable = CLIPNames(config, prefix)
        elif any(k.startswith(embedder + "model.transformer.resblocks.") for k in keys):
            slot, what, prefix = "text_encoder_2", "OpenCLIP text encoder", embedder + "model."
            config = infer_open_clip(_under(shapes, prefix))
            table = OpenCLIPNames(config, prefix)
        else:
            raise unfit(f"conditioner.embedders.{n}", keys)
        if slot in found:
            raise ConversionError(f"the file holds two text encoders of the {slot} kind; this checkpoint is not SDXL.")
        names, unmapped = table.names(keys)
        unmapped += [k for k in keys if not k.startswith(prefix)]
        if unmapped:
            raise unfit(f"conditioner.embedders.{n}", unmapped)
        found[slot] = _Part(config, names, f"{what} {prefix}*")
    return found


def _vae(shapes) -> _Part:
    vae = _under(shapes, VAE_PREFIX)
    if not vae:
        raise ConversionError(
            f"the file holds no VAE ({VAE_PREFIX}*), so it is not a whole SDXL checkpoint; pass --unet-only "
            "to convert its UNet."
        )
    config = infer_vae(vae)
    return _Part(config, _named(VAENames(config), shapes, "VAE"), f"ldm VAE {VAE_PREFIX}*")


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
    """An original SDXL single file (sgm layout): every model."""
    unet, family = _unet(path, source, options)
    if not family.startswith("SDXL"):
        raise ConversionError(
            f"{path} is an {family} checkpoint; only SDXL checkpoints convert as a whole pipeline: "
            "pass --unet-only to convert its UNet."
        )
    if not tokenizers:
        raise ConversionError(
            f"{path} holds no tokenizer files; pass --tokenizers with an SDXL diffusers folder or Hub repo id "
            "(e.g. stabilityai/stable-diffusion-xl-base-1.0) to copy them from, or --unet-only to convert just the UNet."
        )
    found = {**_text_encoders(source.shapes), "vae": _vae(source.shapes)}
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
    copied = pipeline_tokenizers(fetch_tokenizers(tokenizers), models)
    scheduler = {"_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULER_CONFIG}
    return PipelinePlan(models, copied, scheduler, _sdxl_model_index(models, family.startswith("SDXL refiner")),
                        f"{family} single-file checkpoint {path}", notes)
