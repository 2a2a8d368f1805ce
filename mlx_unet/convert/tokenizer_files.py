"""The tokenizer files a converted pipeline carries, in the layout ``CLIPTokenizer.from_folder`` reads:
copied from the source pipeline (or --tokenizers), or, for single files, written from CLIP's
vocabulary that ships with mlx-unet."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError, ConversionError
from ..tokenizer import CLIPTokenizer, bundled_tokenizer_files
from ..tokenizer_folder import FOLDER_FILES
from .layout import TOKENIZERS, read_json

# An added token's entry in tokenizer_config.json's added_tokens_decoder, as transformers 4.34+ writes it.
_ADDED_TOKEN_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


def tokenizer_files(folder: Path) -> dict[str, bytes]:
    """A tokenizer folder's files, by name.

    Folders that transformers 4 saved (the published SDXL repos) are copied, after loading them
    once. transformers 5 saves only tokenizer.json and tokenizer_config.json: vocab.json and
    merges.txt are then written from tokenizer.json's BPE model, and its added tokens, with the
    flags that decide how prompts are split around them, become tokenizer_config.json's
    ``added_tokens_decoder``, where transformers 4.34+ keeps them.
    """
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        _check_tokenizer(folder, f"the tokenizer in {folder}")
        return {f: (folder / f).read_bytes() for f in FOLDER_FILES if (folder / f).is_file()}
    if not (folder / "tokenizer.json").is_file():
        raise ConversionError(
            f"{folder} holds no tokenizer (vocab.json and merges.txt, or tokenizer.json); download it again, or "
            "pass --tokenizers with a pipeline folder or Hub repo id of the same family that has it."
        )
    fast = read_json(folder / "tokenizer.json", "tokenizer")
    config = read_json(folder / "tokenizer_config.json", "tokenizer config")
    model = fast.get("model")
    try:
        if model["type"] != "BPE" or not isinstance(model["vocab"], dict):
            raise TypeError
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        config["added_tokens_decoder"] = {
            str(t["id"]): {k: t[k] for k in _ADDED_TOKEN_FIELDS if k in t} for t in fast.get("added_tokens", [])
        }
    except (KeyError, TypeError):
        raise ConversionError(f"{folder / 'tokenizer.json'} does not hold a BPE tokenizer like CLIP's; download it again.") from None
    files = {
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False).encode(),
        "merges.txt": "\n".join(["#version: 0.2", *merges, ""]).encode(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False).encode(),
    }
    with tempfile.TemporaryDirectory() as written:
        for name, content in files.items():
            (Path(written) / name).write_bytes(content)
        _check_tokenizer(Path(written), f"the tokenizer written from {folder / 'tokenizer.json'}")
    return files


def _check_tokenizer(folder: Path, what: str) -> None:
    """Load it once, so that a tokenizer the pipeline could not load is refused now."""
    try:
        CLIPTokenizer.from_folder(folder)
    except ConfigError as e:
        raise ConversionError(f"{what} does not load: {e}") from None


def pipeline_tokenizers(root: Path, models: Iterable[str]) -> dict[str, dict[str, bytes]]:
    """The files of each tokenizer of ``models``' text encoders, under ``root``."""
    return {name: tokenizer_files(root / name) for encoder, name in TOKENIZERS.items() if encoder in models}


def bundled_tokenizers(models: Iterable[str], pads: dict[str, str]) -> dict[str, dict[str, bytes]]:
    """The files of each tokenizer of ``models``' text encoders from the bundled vocabulary,
    padded as ``pads`` says (tokenizer folder -> pad token)."""
    return {name: bundled_tokenizer_files(pads[name]) for encoder, name in TOKENIZERS.items() if encoder in models}
