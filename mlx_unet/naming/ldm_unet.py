"""Stability's original UNet layout (ldm, and sgm for SDXL) <-> diffusers' UNet2DConditionModel.

The original stores the UNet as ``model.diffusion_model.*`` in three flat lists:
``input_blocks.N.M`` (N counts resnets and downsamplers together, M the parts of one entry: the
resnet, then its transformer), ``middle_block.N`` and ``output_blocks.N.M``. Where each diffusers
block lands follows from the config's layer counts and block types alone.
"""

from __future__ import annotations

from ..configs.unet import UNetConfig
from .table import NameTable

UNET_PREFIX = "model.diffusion_model."

# ResBlock layers are nn.Sequentials in the original; the index skips the parameterless SiLU/Dropout.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# SDXL's pooled-text + time-ids embedding is the original's ADM ``label_emb``.
ADDED_EMBEDDING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _modules(config: UNetConfig) -> dict[str, str]:
    modules = dict(TOP)
    if config.has_text_time_embedding:
        modules.update(ADDED_EMBEDDING)

    def resnet(ours: str, theirs: str) -> None:
        modules[ours] = theirs
        modules.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _RESNET.items()})

    last = config.num_levels - 1
    # Entry 0 of input_blocks is conv_in; each resnet (with its transformer) takes one entry after
    # it, and each downsampler one of its own.
    index = 1
    for level, layers in enumerate(config.layers_per_block):
        for j in range(layers):
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0")
            if config.down_block_types[level] == "CrossAttnDownBlock2D":
                modules[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level < last:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    if config.mid_block_type is not None:
        resnet("mid_block.resnets.0", "middle_block.0")
        modules["mid_block.attentions.0"] = "middle_block.1"
        resnet("mid_block.resnets.1", "middle_block.2")

    # One output entry per up resnet: a level has one more than its down level, for the skip
    # from the downsampler. The upsampler joins the level's last entry, after its transformer.
    index = 0
    for level in range(config.num_levels):
        attention = config.up_block_types[level] == "CrossAttnUpBlock2D"
        for j in range(config.layers_per_block[last - level] + 1):
            resnet(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0")
            if attention:
                modules[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if level < last:
            modules[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{2 if attention else 1}.conv"
    return modules


class UNetNames(NameTable):
    """The original names of one UNet architecture: ``input_blocks.4.1.proj_in`` <->
    ``down_blocks.1.attentions.0.proj_in``. Both layouts store every tensor alike."""

    def __init__(self, config: UNetConfig, prefix: str = UNET_PREFIX):
        super().__init__(_modules(config), prefix)


def ema_name(key: str) -> str:
    """Where LDM's EMA keeps the copy of ``model.diffusion_model.X``: LitEma registers one buffer
    per parameter of the wrapped ``diffusion_model``, and buffer names cannot hold dots."""
    return "model_ema." + key.split(".", 1)[1].replace(".", "")
