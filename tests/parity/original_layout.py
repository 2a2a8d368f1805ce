"""diffusers and transformers weights written in the original single-file layout (ldm / sgm).

Stability's own checkpoints (``sd_xl_base_1.0.safetensors``, ``v1-5-pruned.safetensors``, ...) name
the UNet ``model.diffusion_model.input_blocks.N.M...`` etc. Tests build such files from seeded
diffusers models through the converter's own naming tables (``mlx_unet.naming``), run backwards
here. A table that is wrong both ways would pass such a round trip; test_naming.py and
test_original_layout.py check the tables against diffusers' own single-file converters instead.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch

from mlx_unet import CLIPTextConfig, UNetConfig, VAEConfig
from mlx_unet.convert.infer import infer_clip
from mlx_unet.naming import NameTable
from mlx_unet.naming.clip import CLIP_L_PREFIX, LDM_CLIP_PREFIX, LDM_OPEN_CLIP_PREFIX, OPEN_CLIP_PREFIX, CLIPNames, \
    OpenCLIPNames, checkpoint_names
from mlx_unet.naming.ldm_unet import UNET_PREFIX, UNetNames
from mlx_unet.naming.ldm_vae import VAE_PREFIX, VAENames

BIGG_PREFIX = OPEN_CLIP_PREFIX

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
    "sd2-inpaint": UNetConfig.from_preset("sd2-inpaint", block_out_channels=[64, 128, 128, 128],
                                          attention_head_dim=[1, 2, 2, 2]),
    "sdxl-inpaint": UNetConfig.from_preset(
        "sdxl-inpaint", block_out_channels=[64, 128, 128], attention_head_dim=[1, 2, 2],
        transformer_layers_per_block=[1, 2, 3],
    ),
}


def stored(state_dict: dict[str, torch.Tensor], table: NameTable) -> dict[str, torch.Tensor]:
    """``state_dict`` (diffusers / transformers names) as a file in ``table``'s layout stores it:
    what the table cuts from a stored tensor is put back (rows stacked, transposed back, 1x1
    kernels restored). Tensors are shared where nothing is cut. Raises ``KeyError`` for a name
    the table cannot place, so nothing is dropped silently."""
    pieces: dict[str, list] = defaultdict(list)
    for name, tensor in state_dict.items():
        take = table.take(name)
        if take is None:
            raise KeyError(f"no {type(table).__name__} name for {name!r}")
        pieces[take.key].append((take, tensor))
    out = {}
    for key, taken in pieces.items():
        first, tensor = taken[0]
        if first.rows is not None:
            rows = sorted(taken, key=lambda piece: piece[0].rows[0])
            assert [t.rows for t, _ in rows] == [(i, first.rows[1]) for i in range(first.rows[1])], key
            tensor = torch.cat([t for _, t in rows])
        elif len(taken) > 1:
            raise KeyError(f"{len(taken)} parameters map to {key!r}")
        elif first.transpose:
            tensor = tensor.T.contiguous()
        elif first.squeeze and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[key] = tensor
    return out


def to_original_layout(
    state_dict: dict[str, torch.Tensor], config: UNetConfig, prefix: str = UNET_PREFIX
) -> dict[str, torch.Tensor]:
    """A diffusers UNet's ``state_dict`` under the original checkpoint's names."""
    return stored(state_dict, UNetNames(config, prefix))


# ---------------------------------------------------------------------- text encoders and VAE
# The writers below take bare state dicts, so the configs the tables need are read off them.


def _text_config(state_dict: dict[str, torch.Tensor]) -> CLIPTextConfig:
    return infer_clip({k: tuple(v.shape) for k, v in checkpoint_names(state_dict).items()})


def clip_to_original(state_dict: dict[str, torch.Tensor], prefix: str = CLIP_L_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel under sgm's names: transformers' own (as 4.x had them, with the
    ``text_model.`` that transformers 5 leaves out of a bare CLIPTextModel), below ``prefix``."""
    named = checkpoint_names(state_dict)
    return stored(named, CLIPNames(_text_config(named), prefix))


def open_clip_to_original(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection as open_clip's text tower stores it, with CLIP's
    logit_scale beside it."""
    named = checkpoint_names(state_dict)
    return {prefix + "logit_scale": torch.tensor(4.6052), **stored(named, OpenCLIPNames(_text_config(named), prefix))}


def _vae_config(state_dict: dict[str, torch.Tensor]) -> VAEConfig:
    levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down_blocks."))
    layers = {m[1] for k in state_dict if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    channels = [state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    # The group count is not in the tensors, nor in any name: any that splits every width will do.
    return VAEConfig.from_preset(
        "sdxl", layers_per_block=len(layers), block_out_channels=channels, norm_num_groups=math.gcd(*channels),
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in state_dict,
        use_quant_conv="quant_conv.weight" in state_dict, use_post_quant_conv="post_quant_conv.weight" in state_dict,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
    )


def vae_to_original(state_dict: dict[str, torch.Tensor], prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL as ldm's stores it."""
    return stored(state_dict, VAENames(_vae_config(state_dict), prefix))


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


def sd_single_file(unet: dict[str, torch.Tensor], unet_config: UNetConfig, text_encoder: dict[str, torch.Tensor],
                   vae: dict[str, torch.Tensor], open_clip: bool, text_model: bool = True) -> dict[str, torch.Tensor]:
    """An ldm SD 1.x / 2.x checkpoint: CLIP ViT-L as transformers 4.x saved it (with its
    position_ids buffer; ``text_model=False``: as transformers before 4.x's ``text_model.`` did),
    or (``open_clip``) an OpenCLIP text tower with a projection, and what training left beside
    the models (the noise schedule's buffers, the EMA's counters)."""
    tensors = {**to_original_layout(unet, unet_config), **vae_to_original(vae)}
    if open_clip:
        tensors |= open_clip_to_original(text_encoder, LDM_OPEN_CLIP_PREFIX)
        width = tensors[LDM_OPEN_CLIP_PREFIX + "positional_embedding"].shape[1]
        # ViT-H's projection (to CLIP's joint space), which SD 2.x never uses.
        tensors[LDM_OPEN_CLIP_PREFIX + "text_projection"] = torch.randn(width, width, generator=torch.manual_seed(0))
    else:
        clip = clip_to_original(text_encoder, LDM_CLIP_PREFIX)
        clip[LDM_CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
        tensors |= clip if text_model else {k.replace(".text_model.", ".", 1): v for k, v in clip.items()}
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return {**tensors, "betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0),
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)}
