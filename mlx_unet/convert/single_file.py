"""Original single files (ldm / sgm layout): each part's config inferred from its tensors, then
its parameters named through that config's table in ``mlx_unet.naming``.

Stability's checkpoints (``sd_xl_base_1.0.safetensors``, SD 1.x/2.x files, and the community
fine-tunes that share their layout) hold the UNet as ``model.diffusion_model.*`` and the VAE as
``first_stage_model.*``; the text encoders as ``conditioner.embedders.N.*`` (SDXL, sgm's layout)
or ``cond_stage_model.*`` (SD 1.x / 2.x, ldm's). What a file cannot hold (scheduler, pipeline
class, tokenizers) is written as the family's published pipeline has it (``published.py``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..configs.families import unet_family
from ..configs.unet import UNetConfig
from ..errors import ConversionError
from ..naming import NameTable, Take
from ..naming.clip import LDM_CLIP_PREFIX, LDM_OPEN_CLIP_PREFIX, LDM_TEXT_PREFIX, CLIPNames, OpenCLIPNames, \
    checkpoint_names, penultimate_left_alone
from ..naming.ldm_unet import UNET_PREFIX, UNetNames, ema_name
from ..naming.ldm_vae import VAE_PREFIX, VAENames
from .hub import fetch_tokenizers
from .infer import infer_clip, infer_open_clip, infer_unet, infer_vae, unfit
from .layout import MODELS, UNET, Options
from .plan import PipelinePlan, Plan, with_prediction_type
from .published import Published, published
from .sources import TensorSource
from .tokenizer_files import bundled_tokenizers, pipeline_tokenizers

EMBEDDERS = "conditioner.embedders."
# The parts of a full checkpoint besides the UNet, and what they are.
_COMPONENTS = {
    VAE_PREFIX: "VAE",
    LDM_TEXT_PREFIX: "text encoder",
    EMBEDDERS: "text encoders",
    "model_ema.": "EMA weights",
}


def _under(shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def holds_more_than_a_unet(keys: Iterable[str]) -> bool:
    return any(k.startswith((VAE_PREFIX, EMBEDDERS, LDM_TEXT_PREFIX)) for k in keys)


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
    note: str | None = None  # why some of its tensors are left alone


def _checked_names(table: NameTable, keys: list[str], what: str, left_alone: tuple[str, ...] = ()) -> dict[str, Take]:
    """``table``'s names of ``keys`` (all of one part), refusing any key that fits none and is
    not ``left_alone`` (a start of keys the conversion leaves out on purpose)."""
    names, unmapped = table.names(keys)
    unmapped = [k for k in unmapped if not (left_alone and k.startswith(left_alone))]
    unmapped += [k for k in keys if not k.startswith(table.prefix)]
    if unmapped:
        raise unfit(what, unmapped)
    return names


def _sgm_text_encoders(shapes) -> dict[str, _Part]:
    """``text_encoder`` (CLIP ViT-L, the base only) and ``text_encoder_2`` (OpenCLIP ViT-bigG) of
    an sgm SDXL checkpoint, told apart by layout rather than by embedder number."""
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
        found[slot] = _Part(config, _checked_names(table, keys, f"conditioner.embedders.{n}"), f"{what} {prefix}*")
    return found


def _ldm_text_encoder(shapes) -> dict[str, _Part]:
    """``text_encoder`` of an ldm SD 1.x / 2.x checkpoint, as diffusers converts it: CLIP ViT-L
    whole, or OpenCLIP ViT-H without its last layer and projection (SD 2.x conditions on the
    penultimate layer's token states)."""
    keys = [k for k in shapes if k.startswith(LDM_TEXT_PREFIX)]
    note = None
    left_alone: tuple[str, ...] = ()
    if any(k.startswith(LDM_CLIP_PREFIX) for k in keys):
        what, prefix = "CLIP text encoder", LDM_CLIP_PREFIX
        config = infer_clip(checkpoint_names(_under(shapes, prefix)))
        table: NameTable = CLIPNames(config, prefix)
    elif any(k.startswith(LDM_OPEN_CLIP_PREFIX + "transformer.resblocks.") for k in keys):
        what, prefix = "OpenCLIP text encoder", LDM_OPEN_CLIP_PREFIX
        config = infer_open_clip(_under(shapes, prefix), penultimate=True)
        table = OpenCLIPNames(config, prefix)
        left_alone = penultimate_left_alone(config, prefix)
        note = (f"left alone: the OpenCLIP text encoder's last layer ({left_alone[0]}*) and {left_alone[1]}, "
                "as in diffusers: SD 2.x conditions on the penultimate layer")
    elif keys:
        raise unfit(LDM_TEXT_PREFIX.rstrip("."), keys)
    else:
        return {}
    names = _checked_names(table, keys, LDM_TEXT_PREFIX.rstrip("."), left_alone)
    return {"text_encoder": _Part(config, names, f"{what} {prefix}*", note)}


def _vae(shapes, family: Published) -> _Part:
    vae = _under(shapes, VAE_PREFIX)
    if not vae:
        raise ConversionError(f"the file holds no VAE ({VAE_PREFIX}*), so it is not a whole checkpoint; pass "
                              "--unet-only to convert its UNet.")
    config = infer_vae(vae, family.vae)
    return _Part(config, _named(VAENames(config), shapes, "VAE"), f"ldm VAE {VAE_PREFIX}*")


def plan_pipeline_single_file(path: Path, source: TensorSource, options: Options,
                              tokenizers: str | None = None) -> PipelinePlan:
    """An original single file of SD 1.x / 2.x (ldm layout) or SDXL (sgm layout), every model;
    what the file cannot hold (scheduler, pipeline class, tokenizers) as its family publishes it."""
    unet, family_name = _unet(path, source, options)
    family = published(unet.config)
    if family is None:
        raise ConversionError(f"{path} is an {family_name} checkpoint, of no family whose text encoders and "
                              "scheduler mlx-unet knows; pass --unet-only to convert its UNet.")
    found = _sgm_text_encoders(source.shapes) if family.sdxl else _ldm_text_encoder(source.shapes)
    if ("text_encoder_2" if family.sdxl else "text_encoder") not in found:
        what = f"OpenCLIP text encoder ({EMBEDDERS}N.model.*)" if family.sdxl else f"text encoder ({LDM_TEXT_PREFIX}*)"
        raise ConversionError(f"{path} holds no {what}, so it is not a whole {family_name} checkpoint; pass "
                              "--unet-only to convert its UNet.")
    found["vae"] = _vae(source.shapes, family)
    models = {"unet": unet}
    for name in (n for n in MODELS if n in found):
        part = found[name]
        models[name] = Plan(MODELS[name], part.config, source, part.names, f"{part.description} of {path}",
                            options.dtype_of(name, part.config))
    used = {take.key for plan in models.values() for take in plan.names.values()}
    left = sorted(set(source.shapes) - used)
    more = ", ..." if len(left) > 3 else ""
    notes = [f"left alone: {len(left)} tensors ({', '.join(left[:3])}{more})"] if left else []
    notes += [part.note for part in found.values() if part.note]
    if tokenizers:
        copied = pipeline_tokenizers(fetch_tokenizers(tokenizers), models)
        notes.append(f"tokenizers from {tokenizers}")
    else:
        copied = bundled_tokenizers(models, family.pads)
        pads = ", ".join(f"{name} pads with {family.pads[name]!r}" for name in copied)
        notes.append(f"tokenizers: CLIP's vocabulary, shipped with mlx-unet ({pads})")
    notes.append(f"scheduler: {family.repo}'s {family.scheduler['_class_name']} config")
    if options.prediction_type is None and family.prediction_type == "v_prediction":
        notes.append("prediction type: v_prediction, as diffusers assumes for an SD 2.x file (SD 2.x 768's); pass "
                     "--prediction-type epsilon for an epsilon model (SD 2.x 512 base)")
    scheduler = with_prediction_type(family.scheduler, options, notes)
    return PipelinePlan(models, copied, scheduler, family.model_index(models),
                        f"{family_name} single-file checkpoint {path}", notes)
