"""The ``parameters`` text chunk of a generated PNG, in the form AUTOMATIC1111's web UI writes it
and other SD tools (ComfyUI's importers, InvokeAI, Civitai, image browsers) read:

    a watercolour of a lighthouse at dusk <lora:ink:0.8>
    Negative prompt: fog, grey
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 7, Size: 1024x1024, Model: sdxl-base, Version: mlx-unet 0.1.0

The prompt (any number of lines), then the negative prompt after ``Negative prompt:``, then one
line of ``Key: value`` fields separated by ", "; a value holding a comma, a colon or a line break
is written as a JSON string. ``Size`` is width x height. LoRAs are named in the prompt as
``<lora:NAME:STRENGTH>``, as the web UI writes them.

This text says what other tools understand; ``mlx-unet generate`` keeps its exact settings in a
second chunk of its own (see ``cli/generate_record.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import InputError
from ..schedulers.names import sampler_name, sigma_schedule_name

NEGATIVE = "Negative prompt:"
# A field: a key (a word, then words, spaces, hyphens, slashes), a colon, and a JSON string or
# anything up to the next comma.
_FIELD = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?[^>]*>")
# Fewer fields than this on the last line make it part of the prompt (the web UI's rule too).
_MIN_FIELDS = 3


@dataclass(frozen=True)
class Parameters:
    """A ``parameters`` text, parsed: the prompt, the negative prompt ("" when none) and the
    fields in their order, as text (``fields["Steps"] == "30"``)."""

    prompt: str
    negative_prompt: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    def loras(self) -> list[tuple[str, float]]:
        """The ``<lora:NAME:STRENGTH>`` tags of the prompt (strength 1 where none is given)."""
        tags = []
        for name, strength in _LORA_TAG.findall(self.prompt):
            try:
                tags.append((name, float(strength) if strength else 1.0))
            except ValueError:
                tags.append((name, 1.0))
        return tags

    def prompt_without_loras(self) -> str:
        """The prompt with its LoRA tags taken out, as the web UI hands it to the text encoders."""
        return re.sub(r" ?" + _LORA_TAG.pattern, "", self.prompt).strip()


def _quoted(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_parameters(prompt: str, negative_prompt: str | None, fields: Iterable[tuple[str, Any]],
                      loras: Iterable[tuple[str, float]] = ()) -> str:
    """The ``parameters`` text: ``fields`` (key, value) in order, None values left out; floats as
    ``%g``; ``loras`` (name, strength) appended to the prompt as tags."""
    tags = " ".join(f"<lora:{name}:{strength:g}>" for name, strength in loras)
    lines = [f"{prompt} {tags}" if tags else prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in fields if value is not None))
    return "\n".join(lines)


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            pass  # not JSON after all: the text as written
    return value.strip()


def parse_parameters(text: str) -> Parameters:
    """A ``parameters`` text (ours or the web UI's) parsed; fields it cannot read are kept as text."""
    *lines, last = text.strip().split("\n")
    fields = _FIELD.findall(last)
    if len(fields) < _MIN_FIELDS:
        lines.append(last)
        fields = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    return Parameters("\n".join(prompt).strip(), "\n".join(negative).strip(),
                      {key.strip(): _unquoted(value) for key, value in fields})


def sampler_of(fields: dict[str, str]) -> tuple[str, str | None]:
    """(our sampler, our sigma schedule or None) for the web UI's ``Sampler`` and ``Schedule
    type`` fields: "DPM++ 2M Karras" as written up to web UI 1.8, "DPM++ 2M" with "Schedule
    type: Karras" after; InputError for a sampler or schedule we do not have."""
    sampler, sigmas = sampler_name(fields.get("Sampler", ""))
    if fields.get("Schedule type", "").strip():
        sigmas = sigma_schedule_name(fields["Schedule type"])
    return sampler, None if sigmas == "default" else sigmas


def size_of(fields: dict[str, str]) -> tuple[int, int] | None:
    """(height, width) from ``Size: WIDTHxHEIGHT``; None where absent or unreadable."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", fields.get("Size", ""))
    return None if match is None else (int(match.group(2)), int(match.group(1)))


def number(fields: dict[str, str], key: str, kind: type = int) -> Any:
    """Field ``key`` as ``kind`` (int or float); None where absent; InputError where unreadable."""
    if key not in fields:
        return None
    try:
        return kind(fields[key])
    except ValueError:
        raise InputError(f"the parameters give {key} as {fields[key]!r}, not a number.") from None


def clip_skip_field(clip_skip: int | None) -> int | None:
    """The web UI's ``Clip skip`` for our (diffusers') ``clip_skip``: it counts the last layer as
    1, diffusers as no skip (None or 0); left out (None) where nothing is skipped."""
    return clip_skip + 1 if clip_skip else None


def clip_skip_of(fields: dict[str, str]) -> int | None:
    """Our ``clip_skip`` for the web UI's ``Clip skip`` field (None where it skips nothing)."""
    value = number(fields, "Clip skip")
    return value - 1 if value is not None and value > 1 else None
