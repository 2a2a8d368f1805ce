"""What every config reader here shares: the JSON file, presets and field validators.

A config.json of diffusers or transformers is read once into a frozen dataclass. Architecture
values we do not implement are refused by name; bookkeeping keys the libraries write are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import ConfigError

FORMAT_VERSION = "1"
# model_index.json key marking a pipeline folder that convert.py wrote (diffusers reads keys
# starting with "_" as metadata, so the file stays loadable there).
FORMAT_KEY = "_mlx_unet_format_version"
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def read_config_json(path: str | Path, model: str) -> Any:
    """The fields of a ``config.json`` file, or of the one inside a folder, for a ``model``
    ("UNet", "VAE", ...) named in the errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {model} config at {path}; pass a folder holding config.json.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    return raw  # (from_dict checks that it is an object)


def preset(presets: dict[str, dict[str, Any]], name: str, model: str) -> dict[str, Any]:
    """The fields of preset ``name``, or a ConfigError listing the ``model``'s presets."""
    if name not in presets:
        raise ConfigError(f"unknown {model} preset {name!r}; choose one of {', '.join(presets)}.")
    return presets[name]


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}.")
    return value
