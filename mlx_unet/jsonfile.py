"""JSON read in one place, so that every malformed file is refused in one sentence that names it.

Configs, shard indexes, model_index.json, tokenizer files and safetensors headers come from
downloads and other tools: anything can be in them. ``json.loads`` alone lets through what would
run the wrong model (a key given twice, of which it keeps the last silently) and fails on the
rest with exceptions that are no user error (UnicodeDecodeError, RecursionError for deep nesting).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import MlxUnetError

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


class InvalidJSON(ValueError):
    """Text that is not one unambiguous JSON value; ``reason`` says why, for the caller's message,
    which names the file (this one cannot)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def parse_json(raw: bytes | str) -> Any:
    """The JSON value in ``raw`` (bytes are UTF-8, as RFC 8259 requires and the libraries that
    write these files produce), or ``InvalidJSON``; also for a key given twice in one object,
    which readers resolve differently (Python keeps the last, the safetensors loader refuses
    some such files)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidJSON(_not_utf8(raw, e)) from None
    if raw.startswith("\ufeff"):  # json's own message would advise decoding it away
        raise InvalidJSON("it starts with a byte order mark")
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise InvalidJSON(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except _DuplicateKey as e:
        raise InvalidJSON(f"the key {e.key!r} appears twice in one object") from None
    except RecursionError:
        raise InvalidJSON("nested too deeply") from None


def json_type(value: Any) -> str:
    """``value``'s JSON type name ("array", "string", ...), for messages about the wrong one."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _not_utf8(raw: bytes, e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start}"


def read_text(path: str | Path, what: str, error: type[MlxUnetError], fix: str = "download it again") -> str:
    """The UTF-8 text of the file ``path``, which holds the ``what``; every way it can be
    unusable raises ``error`` (see ``read_json``)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"no {what} at {path}; {fix}.") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, where the {what} should be a file; {fix}.") from None
    except PermissionError:
        raise error(f"{path} cannot be read (permission denied); make it readable or {fix}.") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e}); {fix}.") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is {_not_utf8(raw, e)}; {fix}.") from None


def read_json(path: str | Path, what: str, error: type[MlxUnetError], fix: str = "download it again") -> dict[str, Any]:
    """The JSON object in the file ``path``, which holds the ``what`` ("UNet config", "model_index.json").

    Every way the file can be unusable raises ``error`` with one sentence that names ``path``
    and the problem, then ``fix``, what the user should do ("download it again"): a missing file
    (the sentence is then "no {what} at {path}; {fix}."), a folder in its place, a file that
    cannot be read, bytes that are not UTF-8, text that is not JSON, is nested too deeply or
    gives a key twice, or a value that is not a JSON object (every file read so is one).
    """
    text = read_text(path, what, error, fix)
    try:
        value = parse_json(text)
    except InvalidJSON as e:
        raise error(f"{path} is not valid JSON ({e.reason}); {fix}.") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {json_type(value)} where the {what} must be a JSON object; {fix}.")
    return value
