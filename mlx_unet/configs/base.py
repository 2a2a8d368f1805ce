"""What every config reader here shares: the JSON file, presets, the key rule and field validators.

A config.json of diffusers or transformers (model or scheduler) is read once into a frozen
dataclass, by one rule for its keys (``config_fields``):

* a field the library reads is honoured, or, when its value asks for something this package does
  not implement, refused by name with the value and what is supported;
* bookkeeping keys the libraries write (every ``_``-prefixed key, versions, storage dtypes) and
  keys that cannot change the output (each config lists them) are accepted;
* the ``mlx_unet`` section, our own metadata, is checked;
* any other key is refused, so that a model we cannot run exactly is never run approximately.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Collection, Iterator, Mapping

import mlx.core as mx

from ..errors import ConfigError
from ..jsonfile import read_json

FORMAT_VERSION = "1"
# model_index.json key marking a pipeline folder that convert.py wrote (diffusers reads keys
# starting with "_" as metadata, so the file stays loadable there).
FORMAT_KEY = "_mlx_unet_format_version"
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

# Our section of a model's config.json. diffusers warns about and drops a key its class does not
# take, transformers keeps it as an attribute: both still load the file.
SECTION = "mlx_unet"
# What the section may hold, for this FORMAT_VERSION (quantization: configs/quantization.py).
SECTION_KEYS = ("format_version", "quantization")

# Written by diffusers or transformers about the file, not the model (besides "_"-prefixed keys
# such as _class_name, _diffusers_version, _name_or_path, _commit_hash). The dtype the weights
# were saved in does not bind us: the loader picks the dtype.
BOOKKEEPING = frozenset({"transformers_version", "torch_dtype", "dtype"})


def read_config_json(path: str | Path, model: str, filename: str = "config.json") -> dict[str, Any]:
    """The fields of a ``config.json`` file, or of the one inside a folder, for a ``model``
    ("UNet", "VAE", ...) named in the errors."""
    path = Path(path)
    if path.is_dir() and path.name != filename:  # a folder named config.json is a malformed file, not a model
        path = path / filename
    if not path.exists():  # the user named this path: the fix is another one, not a download
        raise ConfigError(f"no {model} config at {path}; pass a folder holding {filename}.")
    return read_json(path, f"{model} config", ConfigError, "download it again, or convert the model again")


def preset(presets: Mapping[str, dict[str, Any]], name: str, model: str) -> dict[str, Any]:
    """The fields of preset ``name``, or a ConfigError listing the ``model``'s presets."""
    if name not in presets:
        raise ConfigError(f"unknown {model} preset {name!r}; choose one of {', '.join(presets)}.")
    return presets[name]


# ---------------------------------------------------------------------- the key rule


def section(quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``mlx_unet`` section this version writes (with a quantized model's settings)."""
    return {"format_version": FORMAT_VERSION, **({"quantization": quantization} if quantization else {})}


def newer_format(version: Any) -> bool:
    """Whether ``version`` is a format that a later mlx-unet writes: upgrading, not converting
    again, is then the fix."""
    return isinstance(version, str) and version.isdigit() and int(version) > int(FORMAT_VERSION)


def check_section(value: Any) -> dict[str, Any]:
    """A config's ``mlx_unet`` section, refused unless this version can honour all of it."""
    if not isinstance(value, dict):
        raise ConfigError(f"config field {SECTION!r} must be an object, got {value!r}.")
    version = value.get("format_version")
    if newer_format(version):
        raise ConfigError(
            f"this config was written by a newer mlx-unet (format {version}; this one reads format "
            f"{FORMAT_VERSION}): upgrade mlx-unet to load it."
        )
    if version != FORMAT_VERSION:
        raise ConfigError(
            f"config field {SECTION!r} has format_version {version!r}; this mlx-unet reads {FORMAT_VERSION!r}."
        )
    # Checked after the version: a newer format's new keys are explained by the version.
    for key in value:
        if key not in SECTION_KEYS:
            raise ConfigError(
                f"config field {SECTION!r} holds {key!r} = {value[key]!r}, which this mlx-unet does not "
                f"implement (it knows {', '.join(SECTION_KEYS)})."
            )
    if "quantization" in value:
        from .quantization import Quantization  # here: it imports this module

        Quantization.from_dict(value["quantization"])
    return value


def config_fields(
    raw: Any,
    defaults: Mapping[str, Any],
    model: str,
    accepted: Collection[str] = (),
    class_name: str | None = None,
) -> dict[str, Any]:
    """The fields of config dict ``raw`` over the library's ``defaults``, by the rule above.

    ``accepted``: keys that are read past (they cannot change the output). ``class_name``: the
    ``_class_name`` a diffusers config must have, if any. ``model`` names the config in errors.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a {model} config must be a JSON object, got {type(raw).__name__}.")
    kind = raw.get("_class_name", class_name)
    if class_name is not None and kind != class_name:
        raise ConfigError(f"this config describes a {kind}, not a {class_name}.")
    out = dict(defaults)
    for key, value in raw.items():
        if key in defaults:
            out[key] = value
        elif key == SECTION:
            check_section(value)
        elif not (key.startswith("_") or key in BOOKKEEPING or key in accepted):
            raise ConfigError(
                f"config field {key!r} (value {value!r}) is not a {model} field mlx_unet knows; "
                "its effect cannot be reproduced, so the config is refused."
            )
    return out


class ModelConfig:
    """``from_json``, ``from_preset`` and ``to_dict`` for a model config dataclass.

    A subclass defines ``from_dict`` (the library's fields -> the dataclass), ``library_dict``
    (the reverse, which the library's class takes as keyword arguments), ``model_name`` (its name in
    errors) and ``presets``.
    """

    model_name: ClassVar[str]
    presets: ClassVar[Mapping[str, dict[str, Any]]]

    @classmethod
    def from_json(cls, path: str | Path) -> Any:
        """Parse a ``config.json`` file, or the one inside a folder."""
        return cls.from_dict(read_config_json(path, cls.model_name))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Any:
        """One of ``presets`` (the library's field names), optionally with fields overridden."""
        return cls.from_dict({**preset(cls.presets, name, cls.model_name), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """What this package writes as config.json: the library's fields and our section."""
        return {**self.library_dict(), SECTION: section()}


# ---------------------------------------------------------------------- field validators
# Each checks one field and returns it normalised; the error names the field and its value.


@contextmanager
def named(owner: str) -> Iterator[None]:
    """Prefix the ConfigErrors raised inside with ``owner``, where a field name alone is ambiguous."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{owner}: {e}") from None


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """One of ``allowed`` (the same type too: 1 is not True)."""
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise ConfigError(
            f"config field {name!r} = {value!r} is not supported by mlx_unet "
            f"(supported: {' or '.join(repr(a) for a in allowed)})."
        )
    return value


def check_flag(name: str, value: Any, supported: tuple[bool, ...] = (False, True)) -> bool:
    """A boolean field; diffusers treats null like false, so do we."""
    return check_choice(name, False if value is None else value, supported)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"config field {name!r} must be {kind}, got {value!r}.")
    return value


def check_number(name: str, value: Any, positive: bool = False, finite: bool = True) -> float:
    """A number; ``finite=False`` lets infinities through (never NaN)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if not ok or (finite and math.isinf(value)) or (positive and not value > 0):
        kind = "positive" if positive else "finite" if finite else ""
        raise ConfigError(f"config field {name!r} must be a {kind + ' ' if kind else ''}number, got {value!r}.")
    return float(value)


def per_level(name: str, value: Any, levels: int, model: str) -> tuple[Any, ...]:
    """An int (one value for every level) or a list with one entry per level of the ``model``."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ConfigError(f"config field {name!r} has {len(value)} entries but the {model} has {levels} levels.")
        return tuple(value)
    return (value,) * levels
