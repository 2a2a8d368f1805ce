"""UNetConfig: a diffusers UNet2DConditionModel ``config.json``, parsed once and validated.

Every architecture field diffusers reads is either honoured or, when it asks for something this
package does not implement, refused with an error that names the field and its value. Nothing in
a config is silently ignored: unknown fields are refused too, so a model we cannot run exactly is
never run approximately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from .base import ModelConfig, check_choice, check_flag, check_int, check_number, config_fields, per_level

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)


# Fields whose only supported values are diffusers' defaults: anything else selects a feature
# (class labels, ControlNet-XS style blocks, ...) that this package lacks.
_ONLY_DEFAULT: dict[str, tuple[Any, ...]] = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "resnet_time_scale_shift": ("default",),
    # null: as only_cross_attention, which must be false
    "mid_block_only_cross_attention": (None, False),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "act_fn": ("silu",),
    # diffusers itself refuses this field (its issue 2011): head counts live in attention_head_dim.
    "num_attention_heads": (None,),
}
_OFF_FLAGS = ("class_embeddings_concat", "resnet_skip_time_act", "dual_cross_attention")

# Fields read past, as they cannot change the output of the blocks we build: dropout is inactive
# at inference; resnet_out_scale_factor is only read by the SimpleCrossAttn and ResnetDownsample
# block types; addition_embed_type_num_heads only by addition_embed_type "text"; sample_size is
# the training resolution, a hint for pipelines.


@dataclass(frozen=True)
class UNetConfig(ModelConfig):
    """The architecture of one UNet, normalised to per-level tuples.

    ``num_attention_heads`` holds head *counts*. diffusers configs store them under the misnamed
    ``attention_head_dim`` (SD 1.5's ``8`` means 8 heads of width 40/80/160), and the parser
    translates. ``transformer_depths[i]`` lists, for each resnet of down level ``i``, how many
    BasicTransformerBlocks follow it; ``up_transformer_depths`` is the same for the up levels,
    in up order (which has one more layer per level).
    """

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None
    layers_per_block: tuple[int, ...]
    transformer_depths: tuple[tuple[int, ...], ...]
    up_transformer_depths: tuple[tuple[int, ...], ...]
    mid_transformer_depth: int
    num_attention_heads: tuple[int, ...]
    cross_attention_dim: int
    in_channels: int = 4
    out_channels: int = 4
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    time_embedding_dim: int | None = None
    time_cond_proj_dim: int | None = None  # LCM: the width of the guidance-scale embedding
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    sample_size: int | None = None

    # ------------------------------------------------------------------ derived

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def has_text_time_embedding(self) -> bool:
        return self.addition_embed_type == "text_time"

    @property
    def downsample_factor(self) -> int:
        """How much the latent shrinks between conv_in and the mid block."""
        return 2 ** (self.num_levels - 1)

    # ------------------------------------------------------------------ parsing

    model_name: ClassVar[str] = "UNet"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "UNetConfig":
        """Parse a diffusers config dict (as in a ``unet/config.json``)."""
        d = config_fields(raw, _DIFFUSERS_DEFAULTS, "UNet2DConditionModel", class_name="UNet2DConditionModel")
        # A list with every level off means the same as false.
        if isinstance(d["only_cross_attention"], (list, tuple)) and not any(d["only_cross_attention"]):
            d["only_cross_attention"] = False
        check_flag("only_cross_attention", d["only_cross_attention"], (False,))
        for name in _OFF_FLAGS:
            check_flag(name, d[name], (False,))
        for name, supported in _ONLY_DEFAULT.items():
            check_choice(name, d[name], supported)
        return _normalise(d)

    def to_diffusers_dict(self) -> dict[str, Any]:
        """The config in diffusers' field names, loadable by ``UNet2DConditionModel(**d)``."""
        d = asdict(self)
        for key in ("transformer_depths", "up_transformer_depths", "mid_transformer_depth"):
            del d[key]
        per_level = tuple(depths[0] for depths in self.transformer_depths)
        up_layers = tuple(len(depths) for depths in self.up_transformer_depths)
        derived_up = _depth_lists("", tuple(reversed(per_level)), up_layers)
        if all(len(set(x)) == 1 for x in self.transformer_depths) and derived_up == self.up_transformer_depths:
            d["transformer_layers_per_block"] = list(per_level)
        else:
            d["transformer_layers_per_block"] = [list(x) for x in self.transformer_depths]
            d["reverse_transformer_layers_per_block"] = [list(x) for x in self.up_transformer_depths]
        d["attention_head_dim"] = list(d.pop("num_attention_heads"))  # diffusers' naming quirk
        for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block"):
            d[key] = list(d[key])
        # One value for all levels is written as an int, as the published configs do (and as
        # diffusers' single-file loader requires for layers_per_block).
        for key in ("layers_per_block", "attention_head_dim"):
            if len(set(d[key])) == 1:
                d[key] = d[key][0]
        return {"_class_name": "UNet2DConditionModel", **d}

    library_dict = to_diffusers_dict


# Every field of diffusers' UNet2DConditionModel config, with diffusers' defaults.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}


def _depth_lists(name: str, per_level: tuple[Any, ...], layers: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Transformer depth per resnet: an int per level is repeated for each resnet of that level."""
    out = []
    for i, (entry, n) in enumerate(zip(per_level, layers)):
        if isinstance(entry, (list, tuple)):
            if len(entry) != n:
                raise ConfigError(f"config field {name!r}[{i}] has {len(entry)} entries for {n} layers.")
            out.append(tuple(check_int(name, x) for x in entry))
        else:
            out.append((check_int(name, entry),) * n)
    return tuple(out)


def _levels(name: str, d: dict[str, Any], levels: int) -> tuple[Any, ...]:
    return per_level(name, d[name], levels, "UNet")


def _normalise(d: dict[str, Any]) -> UNetConfig:
    down_types = tuple(d["down_block_types"])
    up_types = tuple(d["up_block_types"])
    channels = tuple(check_int("block_out_channels", c) for c in d["block_out_channels"])
    levels = len(channels)
    for name, types, allowed in (
        ("down_block_types", down_types, DOWN_BLOCK_TYPES),
        ("up_block_types", up_types, UP_BLOCK_TYPES),
    ):
        if len(types) != levels:
            raise ConfigError(
                f"config field {name!r} has {len(types)} entries but block_out_channels has {levels}."
            )
        for t in types:
            if t not in allowed:
                raise ConfigError(f"config field {name!r} contains {t!r}; supported: {', '.join(allowed)}.")
    check_choice("mid_block_type", d["mid_block_type"], MID_BLOCK_TYPES)

    layers = tuple(check_int("layers_per_block", x) for x in _levels("layers_per_block", d, levels))
    heads = tuple(check_int("attention_head_dim", x) for x in _levels("attention_head_dim", d, levels))

    cross = _levels("cross_attention_dim", d, levels)
    if len(set(cross)) != 1:
        # One encoder_hidden_states feeds every level; differing widths need encoder_hid_proj.
        raise ConfigError(f"config field 'cross_attention_dim' = {d['cross_attention_dim']!r} must be one width.")
    cross_dim = check_int("cross_attention_dim", cross[0])

    depth_per_level = _levels("transformer_layers_per_block", d, levels)
    down_depths = _depth_lists("transformer_layers_per_block", depth_per_level, layers)
    up_layers = tuple(n + 1 for n in reversed(layers))
    if d["reverse_transformer_layers_per_block"] is not None:
        reverse = _levels("reverse_transformer_layers_per_block", d, levels)
        up_depths = _depth_lists("reverse_transformer_layers_per_block", reverse, up_layers)
    elif any(isinstance(x, (list, tuple)) for x in depth_per_level):
        raise ConfigError(
            "config field 'transformer_layers_per_block' is nested per layer, which needs "
            "'reverse_transformer_layers_per_block' too (as diffusers requires)."
        )
    else:
        up_depths = _depth_lists("transformer_layers_per_block", tuple(reversed(depth_per_level)), up_layers)
    # diffusers hands the mid block the last level's entry and uses its first element.
    mid_depth = down_depths[-1][0]

    groups = d["norm_num_groups"]
    if groups is None:
        raise ConfigError("config field 'norm_num_groups' = None (no output norm) is not supported.")
    check_int("norm_num_groups", groups)
    for c in channels:
        if c % groups:
            raise ConfigError(f"block_out_channels entry {c} is not divisible by norm_num_groups = {groups}.")
    for level, (c, h) in enumerate(zip(channels, heads)):
        if c % h:
            raise ConfigError(
                f"level {level}: {c} channels do not split into {h} attention heads "
                "(attention_head_dim holds head counts in diffusers configs)."
            )

    for name in ("conv_in_kernel", "conv_out_kernel"):
        k = check_int(name, d[name])
        if k % 2 == 0:
            raise ConfigError(f"config field {name!r} = {k} must be odd to keep the latent size.")
    if d["downsample_padding"] not in (0, 1):
        raise ConfigError(f"config field 'downsample_padding' = {d['downsample_padding']!r} must be 0 or 1.")

    # null, or "text_time": the SDXL micro-conditioning.
    addition = check_choice("addition_embed_type", d["addition_embed_type"], (None, "text_time"))
    if addition == "text_time":
        check_int("addition_time_embed_dim", d["addition_time_embed_dim"])
        check_int("projection_class_embeddings_input_dim", d["projection_class_embeddings_input_dim"])
    if d["time_embedding_dim"] is not None:
        check_int("time_embedding_dim", d["time_embedding_dim"])
    # Latent Consistency distillations condition on the guidance scale through the time embedding.
    if d["time_cond_proj_dim"] is not None:
        check_int("time_cond_proj_dim", d["time_cond_proj_dim"])

    return UNetConfig(
        block_out_channels=channels,
        down_block_types=down_types,
        up_block_types=up_types,
        mid_block_type=d["mid_block_type"],
        layers_per_block=layers,
        transformer_depths=down_depths,
        up_transformer_depths=up_depths,
        mid_transformer_depth=mid_depth,
        num_attention_heads=heads,
        cross_attention_dim=cross_dim,
        in_channels=check_int("in_channels", d["in_channels"]),
        out_channels=check_int("out_channels", d["out_channels"]),
        use_linear_projection=check_flag("use_linear_projection", d["use_linear_projection"]),
        upcast_attention=check_flag("upcast_attention", d["upcast_attention"]),  # SDXL's config says null
        addition_embed_type=addition,
        addition_time_embed_dim=d["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=d["projection_class_embeddings_input_dim"],
        norm_num_groups=groups,
        norm_eps=check_number("norm_eps", d["norm_eps"], positive=True),
        flip_sin_to_cos=check_flag("flip_sin_to_cos", d["flip_sin_to_cos"]),
        freq_shift=check_number("freq_shift", d["freq_shift"]),
        time_embedding_dim=d["time_embedding_dim"],
        time_cond_proj_dim=d["time_cond_proj_dim"],
        conv_in_kernel=d["conv_in_kernel"],
        conv_out_kernel=d["conv_out_kernel"],
        downsample_padding=d["downsample_padding"],
        mid_block_scale_factor=check_number("mid_block_scale_factor", d["mid_block_scale_factor"]),
        center_input_sample=check_flag("center_input_sample", d["center_input_sample"]),
        sample_size=d["sample_size"],
    )


# ---------------------------------------------------------------------- presets
# The architecture fields of the published config.json files, in diffusers' names.

_SDXL_BASE = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text + 6 time ids x 256
    "upcast_attention": None,
    "sample_size": 128,
}

_SD15 = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "sample_size": 64,
}

PRESETS: dict[str, dict[str, Any]] = {
    "sdxl-base": _SDXL_BASE,
    "sdxl-turbo": {**_SDXL_BASE, "sample_size": 64},
    "sdxl-refiner": {
        **_SDXL_BASE,
        "block_out_channels": [384, 768, 1536, 1536],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": 4,
        "attention_head_dim": [6, 12, 24, 24],
        "cross_attention_dim": 1280,
        "projection_class_embeddings_input_dim": 2560,  # 1280 pooled + 5 time ids x 256
    },
    "sdxl-inpaint": {**_SDXL_BASE, "in_channels": 9},
    "sd15": _SD15,
    "sd15-inpaint": {**_SD15, "in_channels": 9},
    "sd2": {
        **_SD15,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
        "sample_size": 96,
    },
    "sd2-inpaint": {
        **_SD15,
        "in_channels": 9,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": False,
    },
    # SDXL's structure at a width that runs in milliseconds: for tests, examples and smoke runs.
    "tiny": {
        **_SDXL_BASE,
        "block_out_channels": [32, 64, 64],
        "transformer_layers_per_block": [1, 2, 2],
        "attention_head_dim": [2, 4, 4],
        "norm_num_groups": 8,
        "cross_attention_dim": 48,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 40 + 6 * 8,
        "sample_size": 16,
    },
}
UNetConfig.presets = PRESETS
