"""Configs read off the tensor names and shapes of an original single file (ldm / sgm layout).

Shapes give the widths, layer counts and optional parts; the block numbering gives the UNet's
architecture (which entries are resnets, transformers, down/upsamplers). What the tensors cannot
show (head counts, activations, latent scaling, time-id width) follows the family, recognised by
the UNet's cross-attention width, and the text encoders and VAE take their family's published
values (``published.py``; SDXL's where the families agree).
Keys are given without the part's prefix.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Mapping

from ..configs.clip import CLIPTextConfig
from ..configs.families import SDXL_POOLED, UNET_FAMILIES
from ..configs.unet import UNetConfig
from ..configs.vae import VAEConfig
from ..errors import ConfigError, ConversionError
from ..naming.ldm_unet import ADDED_EMBEDDING, TOP

Shapes = Mapping[str, tuple[int, ...]]

# Head counts are not visible in the weights: SD 1.x uses 8 heads at every level, the others
# 64-wide heads. Each SDXL micro-conditioning id is a 256-wide sinusoid.
_SD1_HEADS = 8
_HEAD_WIDTH = 64  # also every SD / SDXL text encoder's (12 heads for ViT-L, 16 for ViT-H, 20 for ViT-bigG)
_SDXL_TIME_ID_DIM = 256
_UNET_TOP = {*TOP.values(), *ADDED_EMBEDDING.values()}
_NUMBERED = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)|middle_block\.(\d+)\.(.+)")


def _shape(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConversionError(f"the file's {what} has no {key}; it is incomplete.")
    return tuple(shapes[key])


def unfit(what: str, keys, layout: str = "the original SD/SDXL layout") -> ConversionError:
    keys = sorted(keys)
    return ConversionError(
        f"{len(keys)} {what} tensors do not fit {layout} ({', '.join(keys[:5])}); this architecture is not supported."
    )


def _checked(what: str, make):
    """``make()``, with a config it refuses reported as an unsupported file."""
    try:
        return make()
    except ConfigError as e:
        raise ConversionError(f"the file's {what} does not fit a supported configuration: {e}") from None


# ---------------------------------------------------------------------- UNet


def _unet_blocks(shapes: Shapes) -> dict[tuple[str, int], dict[int, dict[str, tuple]]]:
    """The numbered entries: {("input_blocks", 4): {sub: {rest: shape}}}; middle_block entries
    are single modules, sub 0."""
    blocks: dict[tuple[str, int], dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))
    unmapped = []
    for key, shape in shapes.items():
        if key.rpartition(".")[0] in _UNET_TOP:
            continue
        m = _NUMBERED.fullmatch(key)
        if m is None:
            unmapped.append(key)
        elif m[1]:
            blocks[(m[1], int(m[2]))][int(m[3])][m[4]] = shape
        else:
            blocks[("middle_block", int(m[5]))][0][m[6]] = shape
    if unmapped:
        raise unfit("UNet", unmapped)
    return blocks


def _is_transformer(entries: dict[str, tuple]) -> bool:
    return any(r.startswith("transformer_blocks.") for r in entries)


def _depth(entries: dict[str, tuple]) -> int:
    return len({r.split(".")[1] for r in entries if r.startswith("transformer_blocks.")})


def infer_unet(shapes: Shapes) -> UNetConfig:
    """The UNet's config."""
    blocks = _unet_blocks(shapes)
    for key in ("input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight"):
        if key not in shapes:
            raise ConversionError("the file's UNet lacks conv_in / conv_out / time_embed tensors; it is incomplete.")

    # Down path: resnets (+ transformer) until a downsampler ("op") closes the level.
    layer = 0
    down_layers: list[int] = []
    down_depths: list[list[int]] = []  # 0: no transformer
    channels: list[int] = []
    for block in sorted(b for p, b in blocks if p == "input_blocks"):
        subs = blocks[("input_blocks", block)]
        if any(r.startswith("op.") for r in subs.get(0, {})):
            down_layers.append(layer)
            layer = 0
            continue
        if layer == 0:
            channels.append(_shape(subs[0], "out_layers.3.weight", f"input_blocks.{block}.0 resnet")[0])
            down_depths.append([])
        down_depths[-1].append(_depth(subs[1]) if 1 in subs and _is_transformer(subs[1]) else 0)
        layer += 1
    down_layers.append(layer)
    if len(channels) != len(down_layers) or 0 in down_layers:
        raise ConversionError("the file's input_blocks do not form UNet levels; this architecture is not supported.")

    # Mid block: resnet, transformer, resnet.
    mid_blocks = sorted(b for p, b in blocks if p == "middle_block")
    mid_depth = 0
    if mid_blocks:
        if mid_blocks != [0, 1, 2] or not _is_transformer(blocks[("middle_block", 1)][0]):
            raise ConversionError("the file's middle_block is not resnet/transformer/resnet; not supported.")
        mid_depth = _depth(blocks[("middle_block", 1)][0])

    # Up path: level u has one more layer than down level (levels - 1 - u).
    up_layers = [n + 1 for n in reversed(down_layers)]
    out_blocks = sorted(b for p, b in blocks if p == "output_blocks")
    if out_blocks != list(range(sum(up_layers))):
        raise ConversionError(
            f"the file has {len(out_blocks)} output_blocks where its input_blocks imply {sum(up_layers)}; "
            "this architecture is not supported."
        )
    up_depths: list[list[int]] = []
    block = 0
    for count in up_layers:
        up_depths.append([])
        for _ in range(count):
            transformers = [s for sub, s in sorted(blocks[("output_blocks", block)].items()) if sub and _is_transformer(s)]
            up_depths[-1].append(_depth(transformers[0]) if transformers else 0)
            block += 1
    return _unet_config(shapes, channels, down_layers, down_depths, up_depths, mid_depth)


def _unet_config(shapes: Shapes, channels, down_layers, down_depths, up_depths, mid_depth) -> UNetConfig:
    to_k = next((k for k in shapes if k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise ConversionError("the file's UNet has no cross-attention layers; not a Stable Diffusion UNet.")
    cross = shapes[to_k][1]
    if cross not in UNET_FAMILIES:
        raise ConversionError(
            f"cross-attention width {cross} matches no SD family (768 SD 1.x, 1024 SD 2.x, 2048 SDXL base, "
            "1280 SDXL refiner), so its head count is unknown; pass the model's diffusers config with --config."
        )
    conv_in, conv_out = shapes["input_blocks.0.0.weight"], shapes["out.2.weight"]
    inpainting = conv_in[1] == 9  # latents, mask and masked image's latents side by side
    proj_in = next(k for k in shapes if k.endswith("proj_in.weight"))

    # Levels without attention still need a depth in a diffusers config; use what the official
    # configs use (their shared depth where all attention levels agree, as the refiner's "4").
    attention_depths = {d for ds in down_depths + up_depths for d in ds if d} | ({mid_depth} if mid_depth else set())
    filler = attention_depths.pop() if len(attention_depths) == 1 else 1
    down = [[d or filler for d in ds] for ds in down_depths]
    if not any(down_depths[-1]) and mid_depth:
        down[-1] = [mid_depth] * len(down[-1])  # diffusers gives the mid block the last level's depth
    if mid_depth and down[-1][0] != mid_depth:
        raise ConversionError(
            f"the mid block has {mid_depth} transformer layers but the last level {down[-1][0]}, which a "
            "diffusers config cannot express; not supported."
        )
    raw = {
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": conv_out[2],
        "block_out_channels": channels,
        "layers_per_block": down_layers if len(set(down_layers)) > 1 else down_layers[0],
        "down_block_types": ["CrossAttnDownBlock2D" if any(ds) else "DownBlock2D" for ds in down_depths],
        "up_block_types": ["CrossAttnUpBlock2D" if any(ds) else "UpBlock2D" for ds in up_depths],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_depth else None,
        "transformer_layers_per_block": down,
        "reverse_transformer_layers_per_block": [[d or filler for d in ds] for ds in up_depths],
        "attention_head_dim": _SD1_HEADS if cross == 768 else [c // _HEAD_WIDTH for c in channels],
        "cross_attention_dim": cross,
        "use_linear_projection": len(shapes[proj_in]) == 2,
        # SD 2.1 needs float32 attention in half precision (in float32 it changes nothing); SD 2's
        # inpainting model, trained at 512 pixels as SD 1.x, does not.
        "upcast_attention": cross == 1024 and not inpainting,
        "sample_size": 64 if inpainting and cross == 1024 else {768: 64, 1024: 96}.get(cross, 128),
    }
    time_embed = shapes["time_embed.0.weight"][0]
    if time_embed != 4 * channels[0]:
        raw["time_embedding_dim"] = time_embed
    if "label_emb.0.0.weight" in shapes:
        width = shapes["label_emb.0.0.weight"][1]
        time_ids, remainder = divmod(width - SDXL_POOLED, _SDXL_TIME_ID_DIM)
        if remainder or time_ids <= 0:
            raise ConversionError(
                f"the file's label_emb takes {width} features, which is not SDXL's pooled text (1280) plus "
                "256-wide time ids; this added conditioning is not supported."
            )
        raw.update(addition_embed_type="text_time", addition_time_embed_dim=_SDXL_TIME_ID_DIM,
                   projection_class_embeddings_input_dim=width)
    return _checked("UNet", lambda: UNetConfig.from_dict(raw))


# ---------------------------------------------------------------------- VAE


def _numbers(keys, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def infer_vae(shapes: Shapes, published: Mapping[str, Any]) -> VAEConfig:
    """An ldm VAE's config: ``published`` (the family's latent scaling and tile size), SDXL's
    where neither they nor the tensors tell (the SD 1.x / 2.x VAEs share its other values)."""
    levels = len(_numbers(shapes, r"decoder\.up\.(\d+)\."))
    down = _numbers(shapes, r"encoder\.down\.(\d+)\.")
    if down != list(range(levels)):
        raise ConversionError(f"the file's VAE encoder has levels {down} but its decoder {levels}; this VAE is not supported.")
    fields = {
        "in_channels": _shape(shapes, "encoder.conv_in.weight", "VAE")[1],
        "out_channels": _shape(shapes, "decoder.conv_out.weight", "VAE")[0],
        "block_out_channels": [_shape(shapes, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0] for i in range(levels)],
        "layers_per_block": len(_numbers(shapes, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": _shape(shapes, "decoder.conv_in.weight", "VAE")[1],
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }
    return _checked("VAE", lambda: VAEConfig.from_preset("sdxl", **fields, **published))


# ---------------------------------------------------------------------- text encoders


def _check_numbered(layers: list[int], what: str) -> None:
    if layers != list(range(len(layers))):
        raise ConversionError(f"the file's {what} layers are not numbered 0..{len(layers) - 1}; it is incomplete.")


def _clip_config(preset: str, what: str, token_embedding: tuple[int, ...], positions: int, layers: list[int],
                 intermediate: int, projection_dim: int | None) -> CLIPTextConfig:
    vocab, hidden = token_embedding
    _check_numbered(layers, what)
    fields: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": positions,
        "num_hidden_layers": len(layers),
        "intermediate_size": intermediate,
        "num_attention_heads": max(hidden // _HEAD_WIDTH, 1),
    }
    if projection_dim is not None:
        fields.update(architectures=["CLIPTextModelWithProjection"], projection_dim=projection_dim)
    return _checked(what, lambda: CLIPTextConfig.from_preset(preset, **fields))


def infer_clip(shapes: Shapes) -> CLIPTextConfig:
    """CLIP ViT-L in transformers' layout (keys under our names: see ``naming.clip.checkpoint_names``)."""
    what = "CLIP text encoder"
    projection = shapes.get("text_projection.weight")
    return _clip_config(
        "sdxl-clip-l", what, _shape(shapes, "text_model.embeddings.token_embedding.weight", what),
        _shape(shapes, "text_model.embeddings.position_embedding.weight", what)[0],
        _numbers(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
        _shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", what)[0],
        None if projection is None else projection[0])


def infer_open_clip(shapes: Shapes, penultimate: bool = False) -> CLIPTextConfig:
    """OpenCLIP in open_clip's layout: SDXL's ViT-bigG, with its projection (stored (width,
    projection)); or, ``penultimate``, SD 2.x's ViT-H as diffusers converts it: a CLIPTextModel
    without the file's last layer (SD 2.x conditions on the penultimate layer's states) or the
    projection (see ``naming.clip.penultimate_left_alone``)."""
    what = "OpenCLIP text encoder"
    layers = _numbers(shapes, r"transformer\.resblocks\.(\d+)\.")
    projection = None if penultimate else shapes.get("text_projection")
    if penultimate:
        _check_numbered(layers, what)  # before the last is cut off
        if len(layers) < 2:
            raise ConversionError(f"the file's {what} has {len(layers)} layer{'' if len(layers) == 1 else 's'}; SD 2.x "
                                  "conditions on the one before the last, so it needs at least 2.")
    return _clip_config(
        "sd2-clip-h" if penultimate else "sdxl-clip-bigg", what, _shape(shapes, "token_embedding.weight", what),
        _shape(shapes, "positional_embedding", what)[0],
        layers[:-1] if penultimate else layers,
        _shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", what)[0],
        None if projection is None else projection[1])
