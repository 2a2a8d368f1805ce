"""The module names LoRA files use, every layout people meet -> the layer of ours each one updates.

A LoRA names layers, not parameters. For one part of a pipeline (the UNet or a text encoder),
:func:`unet_names` and :func:`text_encoder_names` list every name a file may give each layer:

- kohya / sd-scripts: a part prefix and the module path with dots made underscores. For the
  UNet in diffusers' paths (``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``,
  SD 1.x files) and in the original sgm paths sd-scripts writes for SDXL
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, resnets as ``in_layers_2``,
  ``time_embed_0``, ``label_emb_0_0``...); for text encoders transformers' paths
  (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``) and open_clip's
  (``lora_te2_transformer_resblocks_0_attn_in_proj``: q, k and v fused in one ``in_proj``, so one
  file module updates three of our layers, each a third of its rows).
- diffusers / PEFT: the part's attribute name and the path (``unet.down_blocks.1...attn1.to_q``,
  ``text_encoder_2.text_model.encoder.layers.0.mlp.fc1``); files from diffusers' attention
  processors (``unet....attn1.processor.to_q`` + ``_lora.down.weight``, ``to_out`` for
  ``to_out.0``; ``text_encoder....self_attn.to_q`` for ``q_proj``), and, with no part prefix,
  UNet files saved by ``save_attn_procs``.

The tables come from the layer paths of the model (or config) at hand and the layout tables of
``ldm_unet`` and ``clip``; nothing here parses a name, so an underscore inside a module name
(``transformer_blocks``, ``to_out``) is never mistaken for a separator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from ..configs.clip import CLIPTextConfig
from ..configs.unet import UNetConfig
from .clip import OpenCLIPNames
from .ldm_unet import UNetNames

UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
PARTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
# kohya's prefix of each part: SD 1.x/2.x files name their one text encoder lora_te_, SDXL files
# the two lora_te1_ and lora_te2_.
KOHYA_PREFIXES = {UNET: ("lora_unet_",), TEXT_ENCODER: ("lora_te_", "lora_te1_"), TEXT_ENCODER_2: ("lora_te2_",)}
_ATTENTION_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
_TEXT_PROCESSOR = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
_ATTENTION_LAYER = re.compile(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out\.0)")


@dataclass(frozen=True)
class Target:
    """One layer a file module updates: the part, our module path, and where the file's module
    fuses several of ours, which block of its output rows is this layer's (``(i, n)``)."""

    part: str
    path: str
    rows: tuple[int, int] | None = None


def part_of(module: str) -> str | None:
    """The part a file's module name belongs to, by its prefix; None for a name without one (the
    UNet, in files of diffusers' ``save_attn_procs``)."""
    for part, prefixes in KOHYA_PREFIXES.items():
        if module.startswith(prefixes):
            return part
    head = module.partition(".")[0]
    return head if head in PARTS else None


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _add(names: dict[str, list[Target]], forms: Iterable[str], *targets: Target) -> None:
    for form in forms:
        names.setdefault(form, []).extend(t for t in targets if t not in names.get(form, ()))


def unet_names(config: UNetConfig, paths: Iterable[str]) -> dict[str, list[Target]]:
    """Every name of every UNet layer in ``paths`` (our module paths) -> the layer."""
    sgm = UNetNames(config, prefix="")
    names: dict[str, list[Target]] = {}
    for path in paths:
        forms = ["lora_unet_" + _flat(path), "unet." + path, path]
        source = sgm.to_source(path)
        if source is not None and source != path:
            forms.append("lora_unet_" + _flat(source))
        processor = _ATTENTION_LAYER.fullmatch(path)
        if processor is not None:
            block, short = processor[1], _ATTENTION_PROCESSOR[processor[2]]
            for prefix in ("unet.", ""):
                forms += [f"{prefix}{block}.processor.{short}", f"{prefix}{block}.{short}"]
        _add(names, forms, Target(UNET, path))
    return names


def text_encoder_names(part: str, config: CLIPTextConfig, paths: Iterable[str]) -> dict[str, list[Target]]:
    """Every name of every layer in ``paths`` of text encoder ``part`` (text_encoder or
    text_encoder_2) -> the layer(s)."""
    open_clip = OpenCLIPNames(config, prefix="")
    kohya = KOHYA_PREFIXES[part]
    names: dict[str, list[Target]] = {}
    for path in paths:
        forms = [p + _flat(path) for p in kohya] + [f"{part}.{path}"]
        source = open_clip.to_source(path)
        if source is not None:
            forms += [p + _flat(source) for p in kohya]
        layer, _, projection = path.rpartition(".self_attn.")
        if projection in _TEXT_PROCESSOR:
            forms.append(f"{part}.{layer}.self_attn.{_TEXT_PROCESSOR[projection]}")
        _add(names, forms, Target(part, path))
    # open_clip's fused in_proj: q, k and v are its row blocks 0, 1 and 2.
    present = set(paths)
    for i in range(config.num_hidden_layers):
        attention = f"text_model.encoder.layers.{i}.self_attn"
        qkv = [f"{attention}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        if all(p in present for p in qkv):
            fused = _flat(f"transformer.resblocks.{i}.attn.in_proj")
            _add(names, [p + fused for p in kohya], *(Target(part, p, (j, 3)) for j, p in enumerate(qkv)))
    return names
