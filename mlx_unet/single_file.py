"""Original single-file checkpoints (ldm / sgm layout): UNet key map and config inference.

Stability's checkpoints (``sd_xl_base_1.0.safetensors``, SD 1.x/2.x ``.safetensors``, and the
community fine-tunes that share their layout) store the UNet as ``model.diffusion_model.*`` with
``input_blocks.N.M`` / ``middle_block.N`` / ``output_blocks.N.M`` numbering. The numbering is read
block by block (which entries are resnets, transformers, down/upsamplers), which also tells the
architecture; the few things the tensors cannot show (head counts, time-id width) follow the
family, recognised by its cross-attention width.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping

from .configs.unet import UNetConfig
from .errors import ConfigError, ConversionError

UNET_PREFIX = "model.diffusion_model."

# ResBlock parameter names in the original code -> diffusers' ResnetBlock2D names.
_RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}

# Cross-attention width -> family. Head counts are not visible in the weights: SD 1.x uses 8 heads
# at every level, the others 64-wide heads. SDXL's pooled text embedding is 1280 wide and each
# micro-conditioning id a 256-wide sinusoid.
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL base", 1280: "SDXL refiner"}
_SD1_HEADS = 8
_HEAD_WIDTH = 64
_SDXL_POOLED = 1280
_SDXL_TIME_ID_DIM = 256

# Prefixes of the other parts of a full checkpoint, and what they are.
_COMPONENTS = {
    "first_stage_model.": "VAE",
    "cond_stage_model.": "text encoder",
    "conditioner.embedders.": "text encoders",
    "model_ema.": "EMA weights",
}


@dataclass(frozen=True)
class Take:
    """Where one parameter comes from: a key in the source, and how its (PyTorch-layout) value is
    cut from the stored tensor where the original code stores it differently from diffusers.

    ``rows=(i, n)``: the i-th of n equal row blocks (open_clip fuses q, k and v in one in_proj);
    ``transpose``: a matrix the original multiplies from the right (``x @ W``), where a Linear
    keeps ``W.T``; ``squeeze``: a 1x1 convolution kernel that diffusers holds as a Linear weight.
    """

    key: str
    rows: tuple[int, int] | None = None
    transpose: bool = False
    squeeze: bool = False

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``apply`` makes of a tensor of shape ``stored`` (left alone where it cannot
        apply, so that the shape check reports the stored shape)."""
        shape = tuple(stored)
        if self.rows is not None and shape and shape[0] % self.rows[1] == 0:
            shape = (shape[0] // self.rows[1], *shape[1:])
        if self.squeeze and len(shape) > 2 and all(d == 1 for d in shape[2:]):
            shape = shape[:2]
        if self.transpose and len(shape) == 2:
            shape = shape[::-1]
        return shape

    def apply(self, array):
        """The parameter, from the stored tensor (an MLX or numpy array)."""
        if self.rows is not None:
            index, count = self.rows
            size = array.shape[0] // count
            array = array[index * size:(index + 1) * size]
        if self.squeeze:
            array = array.reshape(array.shape[:2])
        if self.transpose:
            array = array.T
        return array


@dataclass
class SingleFileUNet:
    """What a single file holds: the inferred config and diffusers name -> key in the file."""

    config: UNetConfig
    family: str
    names: dict[str, str]
    ignored: dict[str, int]  # other components left alone (VAE, text encoders, EMA, ...): tensor counts


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


def _split(key: str) -> tuple[str, int, int, str]:
    """'input_blocks.4.1.proj_in.weight' -> ('input_blocks', 4, 1, 'proj_in.weight').

    middle_block entries are single modules ('middle_block.1.proj_in.weight'): sub-index 0.
    """
    if key.startswith("middle_block."):
        part, block, rest = key.split(".", 2)
        return part, int(block), 0, rest
    part, block, sub, rest = key.split(".", 3)
    return part, int(block), int(sub), rest


def _resnet_name(rest: str, key: str) -> str:
    module, _, param = rest.rpartition(".")
    if module not in _RESNET_NAMES:
        raise ConversionError(f"unexpected resnet tensor {key!r} in the single-file checkpoint.")
    return f"{_RESNET_NAMES[module]}.{param}"


def parse(shapes: Mapping[str, tuple[int, ...]], prefix: str = UNET_PREFIX) -> SingleFileUNet:
    """Map and infer from the tensor shapes of a single-file checkpoint (``{key: shape}``)."""
    unet = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    if not unet:
        what = describe_non_unet(list(shapes))
        if what:
            raise ConversionError(f"this file holds {what}, not a UNet; pass a UNet or full Stable Diffusion checkpoint.")
        first = ", ".join(list(shapes)[:3])
        raise ConversionError(
            f"no UNet tensors ({prefix}*) in this file, so its architecture is unknown (first keys: {first})."
        )
    ignored: dict[str, int] = defaultdict(int)
    for key in shapes:
        if not key.startswith(prefix):
            ignored[next((what for p, what in _COMPONENTS.items() if key.startswith(p)), "other")] += 1

    # Group the numbered blocks: {("input_blocks", 4): {sub: {rest: shape}}}.
    blocks: dict[tuple[str, int], dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))
    names: dict[str, str] = {}
    unmapped = []
    for key, shape in unet.items():
        top = next((t for t in _TOP_LEVEL if key.startswith(t + ".")), None)
        if top is not None and key.count(".") == top.count(".") + 1:
            names[_TOP_LEVEL[top] + key[len(top):]] = prefix + key
        elif re.match(r"(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)\.", key):
            part, block, sub, rest = _split(key)
            blocks[(part, block)][sub][rest] = shape
        else:
            unmapped.append(key)
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} UNet tensors do not fit the original SD/SDXL layout "
            f"({', '.join(sorted(unmapped)[:5])}); this architecture is not supported."
        )
    if "conv_in.weight" not in names or "conv_out.weight" not in names or "time_embedding.linear_1.weight" not in names:
        raise ConversionError("the file's UNet lacks conv_in / conv_out / time_embed tensors; it is incomplete.")

    def is_transformer(entries: dict[str, tuple]) -> bool:
        return any(r.startswith("transformer_blocks.") for r in entries)

    def depth(entries: dict[str, tuple]) -> int:
        return len({r.split(".")[1] for r in entries if r.startswith("transformer_blocks.")})

    def add(diffusers_prefix: str, part: str, block: int, sub: int, rest: str, resnet: bool = False):
        name = _resnet_name(rest, f"{part}.{block}.{sub}.{rest}") if resnet else rest
        names[f"{diffusers_prefix}.{name}"] = f"{prefix}{part}.{block}.{sub}.{rest}"

    # ---- down path: resnets (+ transformer) until a downsampler ("op") closes the level
    level, layer = 0, 0
    down_layers: list[int] = []
    down_attention: list[bool] = []
    down_depths: list[list[int]] = []
    channels: list[int] = []
    for block in sorted(b for p, b in blocks if p == "input_blocks"):
        subs = blocks[("input_blocks", block)]
        if any(r.startswith("op.") for r in subs.get(0, {})):
            for rest in subs[0]:
                names[f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"] = f"{prefix}input_blocks.{block}.0.{rest}"
            down_layers.append(layer)
            level, layer = level + 1, 0
            continue
        if layer == 0:
            channels.append(subs[0]["out_layers.3.weight"][0])
            down_attention.append(False)
            down_depths.append([])
        for rest in subs[0]:
            add(f"down_blocks.{level}.resnets.{layer}", "input_blocks", block, 0, rest, resnet=True)
        if 1 in subs and is_transformer(subs[1]):
            down_attention[level] = True
            down_depths[level].append(depth(subs[1]))
            for rest in subs[1]:
                add(f"down_blocks.{level}.attentions.{layer}", "input_blocks", block, 1, rest)
        else:
            down_depths[level].append(0)
        layer += 1
    down_layers.append(layer)
    levels = len(channels)
    if levels != len(down_layers) or 0 in down_layers:
        raise ConversionError("the file's input_blocks do not form UNet levels; this architecture is not supported.")

    # ---- mid block: resnet, transformer, resnet
    mid_blocks = sorted(b for p, b in blocks if p == "middle_block")
    mid_depth = 0
    if mid_blocks:
        if mid_blocks != [0, 1, 2] or not is_transformer(blocks[("middle_block", 1)][0]):
            raise ConversionError("the file's middle_block is not resnet/transformer/resnet; not supported.")
        mid_depth = depth(blocks[("middle_block", 1)][0])
        for block, target in ((0, "resnets.0"), (2, "resnets.1")):
            for rest in blocks[("middle_block", block)][0]:
                names[f"mid_block.{target}.{_resnet_name(rest, rest)}"] = f"{prefix}middle_block.{block}.{rest}"
        for rest in blocks[("middle_block", 1)][0]:
            names[f"mid_block.attentions.0.{rest}"] = f"{prefix}middle_block.1.{rest}"

    # ---- up path: level u has one more layer than down level (levels - 1 - u); the last
    # layer of each level but the final one ends with an upsampler.
    up_layers = [n + 1 for n in reversed(down_layers)]
    up_attention = [False] * levels
    up_depths: list[list[int]] = [[] for _ in range(levels)]
    out_blocks = sorted(b for p, b in blocks if p == "output_blocks")
    if out_blocks != list(range(sum(up_layers))):
        raise ConversionError(
            f"the file has {len(out_blocks)} output_blocks where its input_blocks imply {sum(up_layers)}; "
            "this architecture is not supported."
        )
    block = 0
    for up, count in enumerate(up_layers):
        for layer in range(count):
            subs = blocks[("output_blocks", block)]
            for rest in subs[0]:
                add(f"up_blocks.{up}.resnets.{layer}", "output_blocks", block, 0, rest, resnet=True)
            up_depths[up].append(0)
            for sub in sorted(subs)[1:]:
                if is_transformer(subs[sub]):
                    up_attention[up] = True
                    up_depths[up][-1] = depth(subs[sub])
                    for rest in subs[sub]:
                        add(f"up_blocks.{up}.attentions.{layer}", "output_blocks", block, sub, rest)
                else:
                    for rest in subs[sub]:
                        names[f"up_blocks.{up}.upsamplers.0.{rest}"] = f"{prefix}output_blocks.{block}.{sub}.{rest}"
            block += 1

    config, family = _infer_config(unet, names, channels, down_layers, down_attention, down_depths,
                                   up_attention, up_depths, mid_depth, prefix)
    order = [*_COMPONENTS.values(), "other"]
    return SingleFileUNet(config, family, names, dict(sorted(ignored.items(), key=lambda kv: order.index(kv[0]))))


def _infer_config(unet, names, channels, down_layers, down_attention, down_depths, up_attention, up_depths,
                  mid_depth, prefix) -> tuple[UNetConfig, str]:
    def shape(diffusers_name: str) -> tuple[int, ...]:
        return unet[names[diffusers_name][len(prefix):]]

    to_k = next((n for n in names if n.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise ConversionError("the file's UNet has no cross-attention layers; not a Stable Diffusion UNet.")
    cross = shape(to_k)[1]
    if cross not in _FAMILIES:
        raise ConversionError(
            f"cross-attention width {cross} matches no SD family (768 SD 1.x, 1024 SD 2.x, 2048 SDXL base, "
            "1280 SDXL refiner), so its head count is unknown; pass the model's diffusers config with --config."
        )
    family = _FAMILIES[cross]
    heads: int | list[int] = _SD1_HEADS if cross == 768 else [c // _HEAD_WIDTH for c in channels]

    conv_in = shape("conv_in.weight")
    conv_out = shape("conv_out.weight")
    time_embed = shape("time_embedding.linear_1.weight")[0]
    levels = len(channels)

    # Levels without attention still need a depth in a diffusers config; use what the official
    # configs use (their shared depth where all attention levels agree, as the refiner's "4").
    attention_depths = {d for ds in down_depths + up_depths for d in ds if d} | ({mid_depth} if mid_depth else set())
    filler = attention_depths.pop() if len(attention_depths) == 1 else 1
    down = [[d or filler for d in ds] for ds in down_depths]
    if not down_attention[-1] and mid_depth:
        down[-1] = [mid_depth] * len(down[-1])  # diffusers gives the mid block the last level's depth
    if mid_depth and down[-1][0] != mid_depth:
        raise ConversionError(
            f"the mid block has {mid_depth} transformer layers but the last level {down[-1][0]}, which a "
            "diffusers config cannot express; not supported."
        )
    up = [[d or filler for d in ds] for ds in up_depths]

    raw = {
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": conv_out[2],
        "block_out_channels": channels,
        "layers_per_block": down_layers if len(set(down_layers)) > 1 else down_layers[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_depth else None,
        "transformer_layers_per_block": down,
        "reverse_transformer_layers_per_block": up,
        "attention_head_dim": heads,
        "cross_attention_dim": cross,
        "use_linear_projection": len(shape(next(n for n in names if n.endswith("proj_in.weight")))) == 2,
        # SD 2.1 needs float32 attention in half precision; in float32 it changes nothing.
        "upcast_attention": cross == 1024,
        "sample_size": {768: 64, 1024: 96}.get(cross, 128),
    }
    if time_embed != 4 * channels[0]:
        raw["time_embedding_dim"] = time_embed
    if "add_embedding.linear_1.weight" in names:
        width = shape("add_embedding.linear_1.weight")[1]
        time_ids, remainder = divmod(width - _SDXL_POOLED, _SDXL_TIME_ID_DIM)
        if remainder or time_ids <= 0:
            raise ConversionError(
                f"the file's label_emb takes {width} features, which is not SDXL's pooled text (1280) plus "
                "256-wide time ids; this added conditioning is not supported."
            )
        raw.update(addition_embed_type="text_time", addition_time_embed_dim=_SDXL_TIME_ID_DIM,
                   projection_class_embeddings_input_dim=width)
        family = f"{family} ({time_ids} time ids)"
    if raw["in_channels"] == 9:
        family += ", inpainting"
    if levels != len(up):
        raise ConversionError("the file's up and down paths have different numbers of levels.")
    try:
        config = UNetConfig.from_dict(raw)
    except ConfigError as e:
        raise ConversionError(f"the file's UNet does not fit a supported configuration: {e}") from None
    return config, family


def ema_name(key: str) -> str:
    """Where LDM's EMA keeps the copy of ``model.diffusion_model.X``: dots dropped, under model_ema."""
    return "model_ema." + key.split(".", 1)[1].replace(".", "")
