"""diffusers UNet weights renamed into the original single-file layout (ldm / sgm ``UNetModel``).

Stability's own checkpoints (``sd_xl_base_1.0.safetensors``, ``v1-5-pruned.safetensors``, ...) name
the UNet ``model.diffusion_model.input_blocks.N.M...`` etc. Tests build such files from seeded
diffusers models with ``to_original_layout``. The mapping is written here from the block structure,
independently of diffusers' converter, so that loading the result with diffusers' own
``from_single_file`` checks both directions against each other.
"""

from __future__ import annotations

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
