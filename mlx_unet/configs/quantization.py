"""How a model's Linear layers are quantized, as the ``mlx_unet`` section of its config.json
records it: MLX's mode, bits and group size.

MLX's modes (``mx.quantize``): ``affine`` (a scale and a bias per group of 32, 64 or 128 weights;
we offer 8 and 4 bits), and where the installed MLX has them the microscaling float formats
``mxfp8`` and ``mxfp4`` (groups of 32, a power-of-two scale each, no bias). A folder quantized
in a mode this MLX lacks is refused in a sentence, not half-loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import ConfigError
from .base import SECTION, read_config_json

# mode -> (bits it takes, group sizes it takes)
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "affine": ((8, 4), (32, 64, 128)),
    "mxfp8": ((8,), (32,)),
    "mxfp4": ((4,), (32,)),
}
DEFAULT_GROUP_SIZE = {"affine": 64, "mxfp8": 32, "mxfp4": 32}


def mode_available(mode: str) -> bool:
    """Whether the installed MLX quantizes in ``mode``."""
    bits, groups = MODES[mode]
    try:
        mx.eval(mx.quantize(mx.zeros((1, groups[0])), groups[0], bits[0], mode=mode))
    except (ValueError, TypeError, RuntimeError):
        return False
    return True


@dataclass(frozen=True)
class Quantization:
    """``bits`` per weight in groups of ``group_size`` along each row, in MLX's ``mode``."""

    bits: int
    group_size: int = 64
    mode: str = "affine"

    @classmethod
    def make(cls, bits: int, group_size: int | None = None, mode: str = "affine") -> "Quantization":
        """Checked: the mode exists here, and takes these bits and this group size."""
        if mode not in MODES:
            raise ConfigError(f"quantization mode {mode!r} is not one of {', '.join(MODES)}.")
        group_size = DEFAULT_GROUP_SIZE[mode] if group_size is None else group_size
        allowed_bits, allowed_groups = MODES[mode]
        if isinstance(bits, bool) or bits not in allowed_bits:
            raise ConfigError(f"{mode} quantization takes {' or '.join(map(str, allowed_bits))} bits, got {bits!r}.")
        if isinstance(group_size, bool) or group_size not in allowed_groups:
            raise ConfigError(f"{mode} quantization takes groups of {' or '.join(map(str, allowed_groups))} weights, "
                              f"got {group_size!r}.")
        if not mode_available(mode):
            raise ConfigError(f"the installed MLX {mx.__version__} has no {mode} quantization; upgrade MLX "
                              "(pip install -U mlx) or use affine quantization.")
        return cls(bits, group_size, mode)

    @classmethod
    def from_dict(cls, raw: Any) -> "Quantization":
        if not isinstance(raw, dict) or set(raw) != {"bits", "group_size", "mode"}:
            raise ConfigError(f"config field {SECTION!r}'s quantization must hold bits, group_size and mode, got {raw!r}.")
        return cls.make(raw["bits"], raw["group_size"], raw["mode"])

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}

    def bits_per_weight(self, dtype_size: int) -> float:
        """Storage per weight, the group's scale (and bias) included: 4.5 for affine 4-bit in
        groups of 64 with float16 scales."""
        if self.mode == "affine":
            return self.bits + 2 * 8 * dtype_size / self.group_size
        return self.bits + 8 / self.group_size  # one 8-bit shared exponent per group

    def describe(self) -> str:
        return f"{self.bits}-bit {self.mode}, groups of {self.group_size}"


def as_quantization(value: "Quantization | int | None") -> "Quantization | None":
    """``quantize=`` as the API takes it: a Quantization, a number of bits (affine, groups of
    64), or None."""
    if value is None or isinstance(value, Quantization):
        return value
    return Quantization.make(value)


def text_encoder_quantization(unet: "Quantization | None", requested: Any = None) -> "Quantization | None":
    """The text encoders' quantization beside the UNet's ``unet``. ``requested``: None, the
    default (8 bits when the UNet is quantized, dense when it is not: the encoders run once per
    prompt and lose less at 8 bits); False or "none": dense; 8 or 4 (or "8", "4"): those bits in
    the UNet's family (affine in its group size; mxfp8 / mxfp4 beside an mx mode); a
    Quantization: as it is."""
    if isinstance(requested, str):
        requested = False if requested.lower() == "none" else int(requested) if requested.isdigit() else requested
    if requested is False or (requested is None and unet is None):
        return None
    if isinstance(requested, Quantization):
        return Quantization.make(requested.bits, requested.group_size, requested.mode)
    bits = 8 if requested is None else requested
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ConfigError(f"the text encoders' quantization takes none, 8 or 4 bits, got {requested!r}.")
    if unet is None:
        return Quantization.make(bits)
    try:
        if unet.mode == "affine":
            return Quantization.make(bits, unet.group_size)
        return Quantization.make(bits, None, f"mxfp{bits}")
    except ConfigError as e:  # the UNet's settings passed: say whose these are
        raise ConfigError(f"the text encoders' quantization: {e}") from None


def read_quantization(folder: str | Path, model: str) -> Quantization | None:
    """The quantization a model folder's config.json records (None: dense)."""
    section = read_config_json(folder, model).get(SECTION)
    if not isinstance(section, dict) or "quantization" not in section:
        return None
    return Quantization.from_dict(section["quantization"])
