"""What a PNG of ``mlx-unet generate`` says about the run that made it, and ``--from-png``
reading it back.

Each PNG carries two text chunks:

- ``parameters``: the web UI's form (``pipelines/parameters.py``), for people and other tools;
- ``mlx-unet``: our exact record, JSON: ``{"format": 1, "mlx_unet": VERSION, "mlx": VERSION,
  "settings": {...}, "inputs": {...}}``. ``settings`` holds the image's own prompt and seed
  and every option of the command that changes the pixels, under the option's name (``steps``,
  ``guidance``, ``scheduler``, ``lora`` as ``["FILE:SCALE", ...]``, ...), with the size, sampler and
  strength the run resolved rather than their defaults; ``inputs`` the SHA-256 of the ``image``
  and ``mask`` files it read.

``--from-png`` turns the record back into command-line options and parses them with the command's
own parser, so every value is checked as if typed. Paths are recorded as they were given, so a
rerun from another folder needs them given again. A PNG without our record but with a
``parameters`` chunk (the web UI's, and other tools') gives its common fields: prompts, steps,
CFG scale, seed, size, sampler, clip skip, denoising strength; its model must then be named.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx

from ..errors import InputError, MlxUnetWarning
from ..jsonfile import InvalidJSON, parse_json
from ..pipelines import parameters
from ..pipelines.images import read_png_text
from ..schedulers.names import WEB_UI_SAMPLERS, sampler_name, web_ui_name
from ..version import package_version

PARAMETERS = "parameters"
RECORD = "mlx-unet"
RECORD_FORMAT = 1
# Options that say where the images go or how the command behaves, not what an image is.
# allow_pickle: a PNG from someone else must not turn on the loading of pickles.
UNRECORDED = frozenset({"output", "quiet", "batch_size", "prompts", "from_png", "no_cache", "allow_pickle",
                        "preview", "preview_every", "widen_weights", "no_widen_weights"})
INPUTS = ("image", "mask")  # the options naming input files, whose contents the record hashes
# Options recorded only beside the option they qualify: alone they change nothing.
_QUALIFIES = {"refiner_start": "refiner", "strength": "image", "mask": "image", "lora_mode": "lora",
              "q_group_size": "quantize", "q_mode": "quantize", "quantize_text_encoders": "quantize",
              "revision": "model"}


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _json_value(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else list(map(str, value)) if isinstance(value, list) else value


def record(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``mlx-unet`` record of one image made with ``settings`` (the command's options by
    name, with the image's own prompt and seed); options at None or False are left out."""
    def useful(value: Any) -> bool:
        return value is not None and value is not False and value != []

    kept = {k: _json_value(v) for k, v in settings.items()
            if k not in UNRECORDED and useful(v) and useful(settings.get(_QUALIFIES.get(k), True))}
    inputs = {name: file_digest(settings[name]) for name in INPUTS if settings.get(name) is not None}
    return {"format": RECORD_FORMAT, "mlx_unet": package_version(), "mlx": mx.__version__, "settings": kept,
            "inputs": inputs}


def short_name(source: str) -> str:
    """How the web UI names a model or a LoRA: a file's stem, a folder's name, a Hub id's name."""
    path = Path(source)
    return path.stem if path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin") else path.name


def png_text(settings: dict[str, Any], model: str, loras: Sequence[tuple[str, float]]) -> dict[str, str]:
    """Both text chunks of one image: ``settings`` as for ``record``; ``model`` its name for the
    web UI's form; ``loras`` (source, strength)."""
    s = settings
    sampler, named_sigmas = sampler_name(s["scheduler"])
    sampler, schedule = web_ui_name(sampler, s.get("sigmas") or named_sigmas)
    fields = [("Steps", s["steps"]), ("Sampler", sampler), ("Schedule type", schedule), ("CFG scale", s["guidance"]),
              ("Seed", s["seed"]), ("Size", f"{s['width']}x{s['height']}"), ("Model", short_name(model)),
              ("Denoising strength", s.get("strength")), ("Clip skip", parameters.clip_skip_field(s.get("clip_skip")))]
    if s.get("refiner") is not None:
        fields += [("Refiner", short_name(str(s["refiner"]))), ("Refiner switch at", s["refiner_start"])]
    fields.append(("Version", f"mlx-unet {package_version()}"))
    tags = [(short_name(source), scale) for source, scale in loras]
    text = parameters.format_parameters(s["prompt"], s.get("negative_prompt"), fields, tags)
    return {PARAMETERS: text, RECORD: json.dumps(record(settings), ensure_ascii=False)}


# ---------------------------------------------------------------------------------- reading back

class _RecordParser(argparse.ArgumentParser):
    """The command's parser for a record's options: a value it refuses is the PNG's fault."""

    png: Path

    def error(self, message: str):
        raise InputError(f"{self.png} records a setting this version cannot use ({message}); give the settings "
                         "as options instead.")


def _as_arguments(settings: dict[str, Any], known: set[str]) -> list[str]:
    """A record's settings as the command line that gives them (``--name=value``, so that a value
    starting with "-" stays a value); the prompt last, after ``--``."""
    argv = []
    for name, value in settings.items():
        if name == "prompt" or name not in known:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [f"{flag}={v}" for v in value]
        elif value is not None and value is not False:
            argv.append(f"{flag}={value}")
    return argv + (["--", str(settings["prompt"])] if "prompt" in settings else [])


@dataclass(frozen=True)
class Recorded:
    """What a PNG says made it: ``settings`` by option name; ``digests`` the SHA-256 of the input
    files our record names (by option: "image", "mask"); ``model_name`` another tool's name for
    its model (None in our record, which names the model itself)."""

    settings: dict[str, Any]
    digests: dict[str, str] = field(default_factory=dict)
    model_name: str | None = None


def _from_record(png: Path, text: str, make_parser: Callable[..., argparse.ArgumentParser],
                 known: set[str]) -> Recorded:
    try:
        raw = parse_json(text)
    except InvalidJSON as e:
        raise InputError(f"{png} has a damaged {RECORD} record ({e.reason}); give the settings as options.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("settings"), dict) or raw.get("format") != RECORD_FORMAT:
        raise InputError(f"{png} has an {RECORD} record of a format this version does not read; upgrade "
                         "mlx-unet, or give the settings as options.")
    settings = raw["settings"]
    unknown = sorted(set(settings) - known - {"prompt"})
    if unknown:
        warnings.warn(f"{png} records settings this version does not know ({', '.join(unknown)}); the image may "
                      "differ from it.", MlxUnetWarning, stacklevel=2)
    made = (raw.get("mlx_unet"), raw.get("mlx"))
    if made != (package_version(), mx.__version__):
        warnings.warn(f"{png} was made with mlx-unet {made[0]} and MLX {made[1]}, this is mlx-unet {package_version()} and "
                      f"MLX {mx.__version__}; the image may differ slightly.", MlxUnetWarning, stacklevel=2)
    parser = make_parser(_RecordParser)
    parser.png = png
    inputs = raw.get("inputs") if isinstance(raw.get("inputs"), dict) else {}
    return Recorded(vars(parser.parse_args(_as_arguments(settings, known))),
                    {k: v for k, v in inputs.items() if k in INPUTS and isinstance(v, str)})


def _from_parameters(png: Path, text: str) -> Recorded:
    """The common fields of another tool's ``parameters`` text, as our settings."""
    p = parameters.parse_parameters(text)
    fields = p.fields
    settings: dict[str, Any] = {"prompt": p.prompt_without_loras(), "negative_prompt": p.negative_prompt or None,
                                "steps": parameters.number(fields, "Steps"),
                                "guidance": parameters.number(fields, "CFG scale", float),
                                "seed": parameters.number(fields, "Seed"),
                                "strength": parameters.number(fields, "Denoising strength", float),
                                "clip_skip": parameters.clip_skip_of(fields)}
    size = parameters.size_of(fields)
    if size is not None:
        settings["height"], settings["width"] = size
    if "Sampler" in fields:
        try:
            settings["scheduler"], settings["sigmas"] = parameters.sampler_of(fields)
        except InputError:
            made = fields["Sampler"] + (f", {fields['Schedule type']}" if fields.get("Schedule type") else "")
            raise InputError(f"{png} was made with the sampler {made!r}, which mlx-unet does not have; pass --scheduler "
                             f"(one of {', '.join(WEB_UI_SAMPLERS)}) and --sigmas.") from None
    if p.loras():
        names = ", ".join(f"{name}:{scale:g}" for name, scale in p.loras())
        warnings.warn(f"{png}'s prompt names LoRAs ({names}), which are not loaded from it; pass them with --lora.",
                      MlxUnetWarning, stacklevel=2)
    return Recorded({k: v for k, v in settings.items() if v is not None}, model_name=fields.get("Model"))


def settings_from_png(png: Path, make_parser: Callable[..., argparse.ArgumentParser], known: set[str]) -> Recorded:
    """What ``png`` records: from our record where it has one, else from its ``parameters`` text
    (another tool's). ``make_parser(cls)`` builds the command's parser, of class ``cls``, with every
    default left out; ``known``: the options a record may give."""
    chunks = read_png_text(png)
    if RECORD in chunks:
        return _from_record(png, chunks[RECORD], make_parser, known)
    if PARAMETERS in chunks:
        return _from_parameters(png, chunks[PARAMETERS])
    raise InputError(f"{png} carries no generation parameters (no {PARAMETERS!r} or {RECORD!r} text chunk); pass a "
                     "PNG that mlx-unet or another SD tool wrote, or give the settings as options.")
