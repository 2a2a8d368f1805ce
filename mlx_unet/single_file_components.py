"""Original single-file checkpoints (sgm layout): SDXL's text encoders and VAE, by key tables.

Stability's ``sd_xl_base_1.0.safetensors`` and ``sd_xl_refiner_1.0.safetensors`` hold the whole
pipeline. Besides the UNet (``single_file.py``) they store:

- ``conditioner.embedders.0.transformer.text_model.*``: CLIP ViT-L (base only), already under
  transformers' names;
- ``conditioner.embedders.N.model.*``: OpenCLIP ViT-bigG (N = 1 in the base, 0 in the refiner),
  in open_clip's layout: one fused q/k/v projection per layer, and ``text_projection`` as the
  matrix that multiplies the pooled token from the right;
- ``first_stage_model.*``: the VAE in ldm's layout: ``down.N.block.M``, ``mid.block_1``,
  decoder levels numbered from the lowest resolution up, and attention projections as 1x1
  convolutions.

Configs hold what the tensors show (widths, layer counts, optional parts); the rest (activations,
head width, latent scaling) is SDXL's, as in its published configs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .configs.clip import CLIPTextConfig
from .configs.vae import VAEConfig
from .errors import ConfigError, ConversionError
from .models.clip import checkpoint_names
from .single_file import Take

EMBEDDERS = "conditioner.embedders."
VAE_PREFIX = "first_stage_model."
# Both SDXL encoders use 64-wide attention heads (12 for ViT-L, 20 for ViT-bigG); head counts are
# not visible in the weights.
HEAD_WIDTH = 64

Shapes = Mapping[str, tuple[int, ...]]


@dataclass
class SingleFileComponent:
    """One part of a single file: its inferred config, and each parameter's source."""

    config: Any
    names: dict[str, Take]
    description: str


def _under(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def _unmapped(what: str, keys) -> ConversionError:
    keys = sorted(keys)
    return ConversionError(
        f"{len(keys)} {what} tensors do not fit the original SDXL layout ({', '.join(keys[:5])}); "
        "this checkpoint is not supported."
    )


def _config(cls, preset: str, what: str, **fields):
    try:
        return cls.from_preset(preset, **fields)
    except ConfigError as e:
        raise ConversionError(f"the file's {what} does not fit a supported configuration: {e}") from None


# ---------------------------------------------------------------------- text encoders

# open_clip's per-layer names -> transformers' (ResidualAttentionBlock -> CLIPEncoderLayer).
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# Stored but not parameters of a text encoder: CLIP's contrastive temperature (it scales
# image-text similarities, never the text features), and the position ids buffer (0..76).
_NOT_PARAMETERS = ("logit_scale", "position_ids")
_QKV = ("q_proj", "k_proj", "v_proj")


def _open_clip(shapes: Shapes, prefix: str) -> SingleFileComponent:
    names: dict[str, Take] = {}
    for key in _under(shapes, prefix):
        layer = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(\w+)", key)
        if key in _OPEN_CLIP_TOP:
            names[_OPEN_CLIP_TOP[key]] = Take(prefix + key)
        elif key == "text_projection":
            names["text_projection.weight"] = Take(prefix + key, transpose=True)
        elif layer and layer[2] == "attn" and layer[3] in ("in_proj_weight", "in_proj_bias"):
            param = layer[3].rsplit("_", 1)[1]
            for i, proj in enumerate(_QKV):
                names[f"text_model.encoder.layers.{layer[1]}.self_attn.{proj}.{param}"] = Take(prefix + key, rows=(i, 3))
        elif layer and layer[2] in _OPEN_CLIP_LAYER:
            names[f"text_model.encoder.layers.{layer[1]}.{_OPEN_CLIP_LAYER[layer[2]]}.{layer[3]}"] = Take(prefix + key)
    return SingleFileComponent(_clip_config(shapes, names, "sdxl-clip-bigg", "OpenCLIP text encoder"),
                               names, f"OpenCLIP text encoder {prefix}*")


def _hf_clip(shapes: Shapes, prefix: str) -> SingleFileComponent:
    names = {ours: Take(prefix + key) for ours, key in checkpoint_names({k: k for k in _under(shapes, prefix)}).items()}
    return SingleFileComponent(_clip_config(shapes, names, "sdxl-clip-l", "CLIP text encoder"), names,
                               f"CLIP text encoder {prefix}*")


def _clip_config(shapes: Shapes, names: dict[str, Take], preset: str, what: str) -> CLIPTextConfig:
    def shape(name: str) -> tuple[int, ...]:
        if name not in names:
            raise ConversionError(f"the file's {what} has no {name} (nor its original name); it is incomplete.")
        take = names[name]
        return take.shape(shapes[take.key])

    vocab, hidden = shape("text_model.embeddings.token_embedding.weight")
    layers = {int(m[1]) for n in names if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", n))}
    fields = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": shape("text_model.embeddings.position_embedding.weight")[0],
        "num_hidden_layers": len(layers),
        "intermediate_size": shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_attention_heads": max(hidden // HEAD_WIDTH, 1),
    }
    if "text_projection.weight" in names:
        fields.update(architectures=["CLIPTextModelWithProjection"],
                      projection_dim=shape("text_projection.weight")[0])
    if layers != set(range(len(layers))):
        raise ConversionError(f"the file's {what} layers are not numbered 0..{len(layers) - 1}; it is incomplete.")
    return _config(CLIPTextConfig, preset, what, **fields)


def parse_text_encoders(shapes: Shapes) -> dict[str, SingleFileComponent]:
    """``text_encoder`` (CLIP ViT-L, the base only) and ``text_encoder_2`` (OpenCLIP ViT-bigG) of
    an sgm checkpoint, told apart by layout rather than by embedder number."""
    found: dict[str, SingleFileComponent] = {}
    numbers = sorted({int(m[1]) for k in shapes if (m := re.match(re.escape(EMBEDDERS) + r"(\d+)\.", k))})
    for n in numbers:
        prefix = f"{EMBEDDERS}{n}."
        keys = _under(shapes, prefix)
        if any(k.startswith("transformer.text_model.") for k in keys):
            slot, component = "text_encoder", _hf_clip(shapes, prefix + "transformer.")
        elif any(k.startswith("model.transformer.resblocks.") for k in keys):
            slot, component = "text_encoder_2", _open_clip(shapes, prefix + "model.")
        else:
            raise _unmapped(f"conditioner.embedders.{n}", (prefix + k for k in keys))
        if slot in found:
            raise ConversionError(f"the file holds two text encoders of the {slot} kind; this checkpoint is not SDXL.")
        consumed = {t.key for t in component.names.values()}
        left = [prefix + k for k in keys if prefix + k not in consumed and not k.endswith(_NOT_PARAMETERS)]
        if left:
            raise _unmapped(f"conditioner.embedders.{n}", left)
        found[slot] = component
    return found


# ---------------------------------------------------------------------- VAE

# ldm's ResnetBlock -> diffusers' ResnetBlock2D.
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
# ldm's AttnBlock (1x1 convolutions) -> diffusers' Attention (Linear layers).
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}


def _vae_name(key: str, levels: int) -> tuple[str, bool] | None:
    """diffusers' name of an ldm VAE key (without the prefix), and whether it is a 1x1 kernel to
    squeeze; None when the key fits no rule."""
    if re.fullmatch(r"(post_quant_conv|quant_conv)\.(weight|bias)", key):
        return key, False
    if (m := re.fullmatch(r"(encoder|decoder)\.(\w+)\.(weight|bias)", key)) and m[2] in _VAE_TOP:
        return f"{m[1]}.{_VAE_TOP[m[2]]}.{m[3]}", False
    if (m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)", key)) and m[3] in _VAE_RESNET:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_VAE_RESNET[m[3]]}.{m[4]}", False
    if (m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key)) and m[2] in _VAE_ATTENTION:
        return f"{m[1]}.mid_block.attentions.0.{_VAE_ATTENTION[m[2]]}.{m[3]}", m[2] != "norm"
    m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(?:block\.(\d+)\.(\w+)|(downsample|upsample)\.conv)\.(weight|bias)", key)
    if m is None:
        return None
    encoder = m[1] == "encoder.down"
    # ldm numbers the decoder's levels from the lowest resolution, as the encoder's; diffusers
    # numbers its up blocks in the order they run.
    block = f"encoder.down_blocks.{m[2]}" if encoder else f"decoder.up_blocks.{levels - 1 - int(m[2])}"
    if m[5] == ("downsample" if encoder else "upsample"):
        return f"{block}.{'downsamplers' if encoder else 'upsamplers'}.0.conv.{m[6]}", False
    if m[4] in _VAE_RESNET:
        return f"{block}.resnets.{m[3]}.{_VAE_RESNET[m[4]]}.{m[6]}", False
    return None


def parse_vae(shapes: Shapes) -> SingleFileComponent:
    """The VAE of a single file (``first_stage_model.*``)."""
    vae = _under(shapes, VAE_PREFIX)
    if not vae:
        raise ConversionError(
            f"the file holds no VAE ({VAE_PREFIX}*), so it is not a whole SDXL checkpoint; pass --unet-only "
            "to convert its UNet."
        )
    levels = len({m[1] for k in vae if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
    names: dict[str, Take] = {}
    unmapped = []
    for key in vae:
        mapped = _vae_name(key, levels)
        if mapped is None:
            unmapped.append(VAE_PREFIX + key)
        else:
            names[mapped[0]] = Take(VAE_PREFIX + key, squeeze=mapped[1])
    if unmapped:
        raise _unmapped("VAE", unmapped)

    def shape(name: str) -> tuple[int, ...]:
        if name not in names:
            raise ConversionError(f"the file's VAE has no {name} (nor its original name); it is incomplete.")
        return vae[names[name].key[len(VAE_PREFIX):]]

    down = sorted({int(m[1]) for k in vae if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if down != list(range(levels)):
        raise ConversionError(
            f"the file's VAE encoder has levels {down} but its decoder {levels}; this VAE is not supported."
        )
    layers = len({m[1] for k in vae if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    fields = {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "block_out_channels": [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)],
        "layers_per_block": layers,
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "use_quant_conv": "quant_conv.weight" in names,
        "use_post_quant_conv": "post_quant_conv.weight" in names,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in names,
    }
    fields["down_block_types"] = ["DownEncoderBlock2D"] * levels
    fields["up_block_types"] = ["UpDecoderBlock2D"] * levels
    return SingleFileComponent(_config(VAEConfig, "sdxl", "VAE", **fields), names, f"ldm VAE {VAE_PREFIX}*")
