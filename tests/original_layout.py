"""diffusers and transformers weights renamed into the original single-file layout (ldm / sgm).

Stability's own checkpoints (``sd_xl_base_1.0.safetensors``, ``v1-5-pruned.safetensors``, ...) name
the UNet ``model.diffusion_model.input_blocks.N.M...`` etc. Tests build such files from seeded
diffusers models with ``to_original_layout``. The mapping is written here from the block structure,
independently of diffusers' converter, so that loading the result with diffusers' own
``from_single_file`` checks both directions against each other.
"""

from __future__ import annotations

import re

import torch

from mlx_unet import UNetConfig

# Tiny members of each family that single-file loading must recognise. norm_num_groups and the
# cross-attention widths stay at the real values, since configs are inferred from such files.
SINGLE_FILE_FAMILIES: dict[str, UNetConfig] = {
    "sdxl-base": UNetConfig.from_preset(
        "sdxl-base", block_out_channels=[64, 128, 128], attention_head_dim=[1, 2, 2],
        transformer_layers_per_block=[1, 2, 3],
    ),
    "sdxl-refiner": UNetConfig.from_preset(
        "sdxl-refiner", block_out_channels=[64, 128, 192, 192], attention_head_dim=[1, 2, 3, 3],
        transformer_layers_per_block=2,
    ),
    "sd15": UNetConfig.from_preset("sd15", block_out_channels=[32, 64, 64, 64]),
    "sd2": UNetConfig.from_preset("sd2", block_out_channels=[64, 128, 128, 128], attention_head_dim=[1, 2, 2, 2]),
    "sd15-inpaint": UNetConfig.from_preset("sd15-inpaint", block_out_channels=[32, 64, 64, 64]),
}

# ResBlock layers are nn.Sequentials in the original; the index skips the parameterless SiLU/Dropout.
_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _module_names(config: UNetConfig) -> dict[str, str]:
    """diffusers module path -> original module path, for every module that holds weights."""
    names = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        # SDXL's pooled-text + time-ids embedding is the original's ADM ``label_emb``.
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    last = config.num_levels - 1

    # input_blocks is one flat list: each resnet (with its transformer) is one entry, and each
    # downsampler takes an entry of its own.
    index = 1
    for level, layers in enumerate(config.layers_per_block):
        for j in range(layers):
            names[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{index}.0"
            if config.down_block_types[level] == "CrossAttnDownBlock2D":
                names[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level < last:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    if config.mid_block_type is not None:
        names["mid_block.resnets.0"] = "middle_block.0"
        names["mid_block.attentions.0"] = "middle_block.1"
        names["mid_block.resnets.1"] = "middle_block.2"

    # output_blocks: one entry per up resnet (one more per level than going down, for the skip of
    # the downsampler); the upsampler joins the level's last entry, after the transformer if any.
    index = 0
    for level in range(config.num_levels):
        attention = config.up_block_types[level] == "CrossAttnUpBlock2D"
        for j in range(config.layers_per_block[last - level] + 1):
            names[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attention:
                names[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if level < last:
            names[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{2 if attention else 1}.conv"
    return names


def to_original_layout(
    state_dict: dict[str, torch.Tensor], config: UNetConfig, prefix: str = "model.diffusion_model."
) -> dict[str, torch.Tensor]:
    """``state_dict`` (diffusers names) under the original checkpoint's names; tensors are shared.

    Raises ``KeyError`` for a name it cannot place, so nothing is dropped silently.
    """
    modules = _module_names(config)
    out = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        # The longest module path that matches: transformer internals keep their names below it.
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in modules:
                break
        else:
            raise KeyError(f"no original name for diffusers parameter {key!r}")
        rest = parts[cut:]
        if ".resnets." in module:
            rest = [_RESNET_NAMES[rest[0]], *rest[1:]]
        new_key = prefix + ".".join([modules[module], *rest])
        if new_key in out:
            raise KeyError(f"{key!r} and another parameter both map to {new_key!r}")
        out[new_key] = tensor
    return out


def ema_key(original_key: str) -> str:
    """Where LDM checkpoints keep the EMA copy of ``model.diffusion_model.X``.

    LDM's LitEma registers one buffer per parameter of the wrapped model (``diffusion_model.X``),
    named with the dots removed because buffer names cannot contain dots.
    """
    if not original_key.startswith("model."):
        raise ValueError(f"{original_key!r} is not a model.* parameter name")
    return "model_ema." + original_key.removeprefix("model.").replace(".", "")


# ---------------------------------------------------------------------- text encoders and VAE
# sgm's SDXL checkpoints hold the whole pipeline. These maps are written from the original
# modules (open_clip's ResidualAttentionBlock, ldm's Encoder/Decoder), and checked against
# diffusers' own single-file converters in test_original_layout.py.

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # FrozenCLIPEmbedder: a transformers CLIPTextModel
BIGG_PREFIX = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
VAE_PREFIX = "first_stage_model."


def clip_to_original(state_dict: dict[str, torch.Tensor], prefix: str = CLIP_L_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel under sgm's names: transformers' own (as 4.x had them, with the
    ``text_model.`` that transformers 5 leaves out of a bare CLIPTextModel), below ``prefix``."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state_dict.items()}


# transformers' CLIPEncoderLayer -> open_clip's ResidualAttentionBlock.
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_original(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection as open_clip's text tower stores it: q, k and v
    stacked into nn.MultiheadAttention's in_proj, the projection as a (width, embed) matrix applied
    as ``x @ text_projection``, and CLIP's logit_scale beside them."""
    out = {prefix + "logit_scale": torch.tensor(4.6052)}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        layer = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = tensor
        elif layer and layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault(f"transformer.resblocks.{layer[1]}.attn.in_proj_{layer[3]}", {})[layer[2]] = tensor
        elif layer:
            out[f"{prefix}transformer.resblocks.{layer[1]}.{_OPEN_CLIP_LAYER[layer[2]]}.{layer[3]}"] = tensor
        else:
            raise KeyError(f"no open_clip name for {key!r}")
    for name, parts in fused.items():
        out[prefix + name] = torch.cat([parts[f"self_attn.{x}_proj"] for x in "qkv"])
    return out


_LDM_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_LDM_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(state_dict: dict[str, torch.Tensor], prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL as ldm's stores it: levels as ``down.N`` / ``up.N`` (the decoder's
    numbered from the lowest resolution), ``mid.block_1``, and the mid attention as 1x1 convolutions."""
    levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.up_blocks."))
    out = {}
    for key, tensor in state_dict.items():
        part, rest = key.split(".", 1)
        module, _, param = rest.rpartition(".")
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
            name = f"{part}.{m[1]}.{level}.block.{m[3]}.{_LDM_RESNET[m[4]]}"
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv", module):
            level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
            name = f"{part}.{m[1]}.{level}.{m[3]}sample.conv"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)", module):
            name = f"{part}.mid.block_{int(m[1]) + 1}.{_LDM_RESNET[m[2]]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
            name = f"{part}.mid.attn_1.{_LDM_ATTENTION[m[1]]}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        elif module in ("conv_in", "conv_out", "conv_norm_out") and part in ("encoder", "decoder"):
            name = f"{part}.{module.replace('conv_norm_out', 'norm_out')}"
        elif part in ("quant_conv", "post_quant_conv"):
            name = part
        else:
            raise KeyError(f"no ldm name for {key!r}")
        out[f"{prefix}{name}.{param}"] = tensor
    return out


def sdxl_single_file(unet: dict[str, torch.Tensor], unet_config: UNetConfig, text_encoder_2: dict[str, torch.Tensor],
                     vae: dict[str, torch.Tensor], text_encoder: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """An sgm SDXL checkpoint: the base when ``text_encoder`` (CLIP ViT-L) is given, else the refiner."""
    tensors = {**to_original_layout(unet, unet_config), **vae_to_original(vae)}
    if text_encoder is not None:
        tensors |= clip_to_original(text_encoder)
        # Written by transformers 4.x, which saved this buffer too.
        tensors[CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    tensors |= open_clip_to_original(text_encoder_2, BIGG_PREFIX["base" if text_encoder is not None else "refiner"])
    return tensors
