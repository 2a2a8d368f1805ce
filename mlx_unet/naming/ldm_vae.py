"""ldm's VAE layout (``first_stage_model.*`` in Stability's single files) <-> diffusers' AutoencoderKL.

ldm numbers levels ``down.N`` / ``up.N`` and resnets ``block.M``; its decoder's levels count from
the lowest resolution, as the encoder's do, where diffusers numbers its up blocks in the order they
run. The mid block's attention is four 1x1 convolutions, which diffusers holds as Linear layers.
"""

from __future__ import annotations

from ..configs.vae import VAEConfig
from .table import NameTable

VAE_PREFIX = "first_stage_model."

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}


def _modules(config: VAEConfig) -> dict[str, str]:
    modules: dict[str, str] = {}

    def resnet(ours: str, theirs: str) -> None:
        modules[ours] = theirs
        modules.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _RESNET.items()})

    levels = len(config.block_out_channels)
    for part in ("encoder", "decoder"):
        modules.update({f"{part}.{a}": f"{part}.{b}" for a, b in _TOP.items()})
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        if config.mid_block_add_attention:
            modules[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
            modules.update({f"{part}.mid_block.attentions.0.{a}": f"{part}.mid.attn_1.{b}" for a, b in _ATTENTION.items()})
    for level in range(levels):
        for j in range(config.layers_per_block):
            resnet(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}")
        if level < levels - 1:
            modules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
        up = levels - 1 - level
        for j in range(config.layers_per_block + 1):  # the decoder runs one resnet more per level, in both
            resnet(f"decoder.up_blocks.{level}.resnets.{j}", f"decoder.up.{up}.block.{j}")
        if level < levels - 1:
            modules[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    if config.use_quant_conv:
        modules["quant_conv"] = "quant_conv"
    if config.use_post_quant_conv:
        modules["post_quant_conv"] = "post_quant_conv"
    return modules


class VAENames(NameTable):
    """The ldm names of one VAE architecture: ``decoder.up.3.block.0`` <-> ``decoder.up_blocks.0.resnets.0``."""

    def __init__(self, config: VAEConfig, prefix: str = VAE_PREFIX):
        super().__init__(_modules(config), prefix)

    def _how(self, parameter: str) -> dict:
        module = parameter.rpartition(".")[0]
        projection = module.endswith(tuple(f"mid_block.attentions.0.{p}" for p in _ATTENTION if p != "group_norm"))
        return {"squeeze": True} if projection else {}
