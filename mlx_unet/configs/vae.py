"""VAEConfig: a diffusers AutoencoderKL ``config.json``, parsed once and validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from .base import ModelConfig, check_choice, check_flag, check_int, check_number, config_fields

# Every field of diffusers' AutoencoderKL config, with diffusers' defaults.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """The architecture and latent scaling of one AutoencoderKL.

    ``sample_size`` is the image size the VAE was trained at; it is the default tile size for
    tiled decoding. ``force_upcast`` says the VAE's activations overflow float16 (SDXL's do), so
    it is run in float32 unless asked otherwise.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    model_name: ClassVar[str] = "VAE"

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel, along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "VAEConfig":
        """Parse a diffusers config dict (as in a ``vae/config.json``)."""
        return _normalise(config_fields(raw, _DIFFUSERS_DEFAULTS, "AutoencoderKL", class_name="AutoencoderKL"))

    def to_diffusers_dict(self) -> dict[str, Any]:
        """The config in diffusers' field names, loadable by ``AutoencoderKL(**d)``."""
        levels = len(self.block_out_channels)
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            **d,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "act_fn": "silu",
        }

    library_dict = to_diffusers_dict


def _normalise(d: dict[str, Any]) -> VAEConfig:
    if not isinstance(d["block_out_channels"], (list, tuple)) or not d["block_out_channels"]:
        raise ConfigError(f"config field 'block_out_channels' must be a non-empty list, got {d['block_out_channels']!r}.")
    channels = tuple(check_int("block_out_channels", c) for c in d["block_out_channels"])
    levels = len(channels)
    for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = d[name]
        if not isinstance(types, (list, tuple)) or len(types) != levels:
            raise ConfigError(
                f"config field {name!r} = {types!r} must list one block type per entry of block_out_channels ({levels})."
            )
        other = next((t for t in types if t != allowed), None)
        if other is not None:
            raise ConfigError(
                f"config field {name!r} holds {other!r}; only {allowed!r} is supported (the AutoencoderKL of SD and SDXL)."
            )
    check_choice("act_fn", d["act_fn"], ("silu",))
    # Pipelines, not the model, read these. diffusers' SD and SDXL pipelines divide latents by
    # scaling_factor alone (SD3 and Flux add shift_factor; SDXL's uses latents_mean and latents_std
    # when set), and so does ours: a VAE that needs them would be sampled in the wrong latent space.
    for name in ("shift_factor", "latents_mean", "latents_std"):
        if d[name] is not None:
            raise ConfigError(
                f"config field {name!r} = {d[name]!r} is not supported by mlx_unet (supported: None); "
                "latents are only scaled by scaling_factor."
            )
    groups = check_int("norm_num_groups", d["norm_num_groups"])
    for c in channels:
        if c % groups:
            raise ConfigError(f"block_out_channels entry {c} does not split into norm_num_groups = {groups} groups.")
    sample_size = d["sample_size"]
    # diffusers accepts [height, width] here but tiles with the first entry only; a square one is that int.
    if isinstance(sample_size, (list, tuple)) and len(set(sample_size)) == 1:
        sample_size = sample_size[0]
    return VAEConfig(
        in_channels=check_int("in_channels", d["in_channels"]),
        out_channels=check_int("out_channels", d["out_channels"]),
        block_out_channels=channels,
        layers_per_block=check_int("layers_per_block", d["layers_per_block"]),
        latent_channels=check_int("latent_channels", d["latent_channels"]),
        norm_num_groups=groups,
        sample_size=check_int("sample_size", sample_size),
        scaling_factor=check_number("scaling_factor", d["scaling_factor"], positive=True),
        force_upcast=check_flag("force_upcast", d["force_upcast"]),
        use_quant_conv=check_flag("use_quant_conv", d["use_quant_conv"]),
        use_post_quant_conv=check_flag("use_post_quant_conv", d["use_post_quant_conv"]),
        mid_block_add_attention=check_flag("mid_block_add_attention", d["mid_block_add_attention"]),
    )


# The architecture fields of the published config.json files, in diffusers' names.
VAE_PRESETS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
    "sdxl": {
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    },
}

# SDXL's structure (four levels, so latents are 1/8 of the image) at a width that runs in
# milliseconds; its 128-pixel tiles match the tiny UNet preset's 16-pixel latents.
VAE_PRESETS["tiny"] = {
    **VAE_PRESETS["sdxl"], "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8, "sample_size": 128,
    "force_upcast": False,
}
VAEConfig.presets = VAE_PRESETS


# ---------------------------------------------------------------------- the tiny VAE

# Every field of diffusers' AutoencoderTiny config, with diffusers' defaults: those of TAESD and
# TAESDXL (madebyollin/taesd, madebyollin/taesdxl), which differ only in their weights.
_TINY_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": (64, 64, 64, 64),
    "decoder_block_out_channels": (64, 64, 64, 64),
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": (1, 3, 3, 3),
    "num_decoder_blocks": (3, 3, 3, 1),
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}
# diffusers writes both into every AutoencoderTiny config and overrides both as it builds the
# model (block_out_channels := decoder_block_out_channels, force_upcast := false): read past.
_TINY_OVERRIDDEN = ("block_out_channels", "force_upcast")


@dataclass(frozen=True)
class TinyVAEConfig(ModelConfig):
    """The architecture and latent scaling of one AutoencoderTiny (TAESD, TAESDXL).

    Each level of the encoder (decoder) is a stride-2 convolution (a 2x upsampling) and
    ``num_encoder_blocks`` (``num_decoder_blocks``) residual blocks, all at one width.
    ``scaling_factor`` is 1: TAESD was distilled on latents already scaled for the UNet.
    ``latent_magnitude`` and ``latent_shift`` only map latents to [0, 1] for storing them as
    8-bit images (diffusers' ``scale_latents``); encoding and decoding do not read them.
    """

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    latent_channels: int = 4
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    scaling_factor: float = 1.0

    model_name: ClassVar[str] = "tiny VAE"

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel, along each side, of the encoder."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @property
    def upsample_factor(self) -> int:
        """Image pixels per latent pixel, along each side, of the decoder."""
        return 2 ** (len(self.decoder_block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TinyVAEConfig":
        """Parse a diffusers config dict (an AutoencoderTiny ``config.json``)."""
        d = config_fields(raw, _TINY_DEFAULTS, "AutoencoderTiny", _TINY_OVERRIDDEN, class_name="AutoencoderTiny")
        act = d["act_fn"]
        check_choice("act_fn", act.lower() if isinstance(act, str) else act, ("relu",))  # diffusers lowercases it
        check_choice("upsample_fn", d["upsample_fn"], ("nearest",))
        check_choice("upsampling_scaling_factor", d["upsampling_scaling_factor"], (2,))
        if d["shift_factor"] not in (None, 0):  # as VAEConfig: SD and SDXL pipelines never shift latents
            raise ConfigError(f"config field 'shift_factor' = {d['shift_factor']!r} is not supported by mlx_unet "
                              "(supported: 0); latents are only scaled by scaling_factor.")
        return TinyVAEConfig(
            in_channels=check_int("in_channels", d["in_channels"]),
            out_channels=check_int("out_channels", d["out_channels"]),
            encoder_block_out_channels=_one_width("encoder_block_out_channels", d["encoder_block_out_channels"]),
            decoder_block_out_channels=_one_width("decoder_block_out_channels", d["decoder_block_out_channels"]),
            latent_channels=check_int("latent_channels", d["latent_channels"]),
            num_encoder_blocks=_blocks("num_encoder_blocks", d["num_encoder_blocks"], d["encoder_block_out_channels"]),
            num_decoder_blocks=_blocks("num_decoder_blocks", d["num_decoder_blocks"], d["decoder_block_out_channels"]),
            latent_magnitude=check_number("latent_magnitude", d["latent_magnitude"], positive=True),
            latent_shift=check_number("latent_shift", d["latent_shift"]),
            scaling_factor=check_number("scaling_factor", d["scaling_factor"], positive=True),
        )

    def to_diffusers_dict(self) -> dict[str, Any]:
        """The config in diffusers' field names, loadable by ``AutoencoderTiny(**d)``."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"_class_name": "AutoencoderTiny", **d, "act_fn": "relu", "upsample_fn": "nearest",
                "upsampling_scaling_factor": 2, "shift_factor": 0.0}

    library_dict = to_diffusers_dict


def _one_width(name: str, value: Any) -> tuple[int, ...]:
    """A list of channel counts, one per level, all equal: diffusers' EncoderTiny and DecoderTiny
    chain their levels with convolutions that keep each level's own width, so a second width
    would fail at its first call there."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"config field {name!r} must be a non-empty list, got {value!r}.")
    channels = tuple(check_int(name, c) for c in value)
    if len(set(channels)) > 1:
        raise ConfigError(f"config field {name!r} = {list(channels)} changes width between levels, which diffusers' "
                          "AutoencoderTiny cannot run; every entry must be the same.")
    return channels


def _blocks(name: str, value: Any, channels: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != len(channels):
        raise ConfigError(f"config field {name!r} = {value!r} must give one block count per level "
                          f"({len(channels)}, as its block_out_channels).")
    return tuple(check_int(name, n, minimum=0) for n in value)


TINY_VAE_PRESETS: dict[str, dict[str, Any]] = {
    "taesd": {},  # madebyollin/taesd and madebyollin/taesdxl: diffusers' defaults
    # TAESD's structure (four levels, one block in the decoder's last) at a width that runs in
    # milliseconds.
    "tiny": {"encoder_block_out_channels": [8] * 4, "decoder_block_out_channels": [8] * 4,
             "num_encoder_blocks": [1, 2, 1, 1], "num_decoder_blocks": [1, 2, 1, 1]},
}
TinyVAEConfig.presets = TINY_VAE_PRESETS
