"""A tokenizer folder's files read and checked, as transformers' CLIPTokenizer reads them:
vocab.json, merges.txt, tokenizer_config.json and the optional special_tokens_map.json and
added_tokens.json, and from them the added tokens and the named ones (start, end, pad)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import ConfigError
from .jsonfile import read_json, read_text

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
# A tokenizer folder's files: the first two are the tokenizer itself, the last two are optional.
FOLDER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# The token attributes transformers reads from the files, in the order it registers them.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# CLIPTokenizer's defaults for the ones the files leave out.
_DEFAULT_TOKENS = {"bos_token": START_OF_TEXT, "eos_token": END_OF_TEXT,
                   "unk_token": END_OF_TEXT, "pad_token": END_OF_TEXT}


def files_digest(folder: Path) -> bytes | None:
    """A digest of the names and bytes of ``folder``'s FOLDER_FILES (a missing one counts as
    missing); None where one cannot be read, for the parse to say why."""
    digest = hashlib.sha256()
    for name in FOLDER_FILES:
        try:
            data = (folder / name).read_bytes()
        except FileNotFoundError:
            digest.update(f"{name}: missing\n".encode())
            continue
        except OSError:
            return None
        digest.update(f"{name}: {len(data)}\n".encode())
        digest.update(data)
    return digest.digest()


def read_folder(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict, dict, dict]:
    """``folder``'s vocabulary, merges, tokenizer_config.json, special_tokens_map.json and
    added_tokens.json (the last two empty where absent); one sentence for a missing or
    malformed file."""
    vocab = _read_json(folder / "vocab.json")
    if not all(isinstance(t, str) and type(i) is int for t, i in vocab.items()):
        raise ConfigError(f"{folder / 'vocab.json'} must map each token to an integer id; download it again.")
    merges = _read_merges(folder / "merges.txt")
    config = _read_json(folder / "tokenizer_config.json")
    optional = [folder / "special_tokens_map.json", folder / "added_tokens.json"]
    return vocab, merges, config, *(_read_json(path) if path.exists() else {} for path in optional)


def _check_present(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"{path} is missing; copy the tokenizer folder whole from the pipeline.")


def _read_json(path: Path) -> dict:
    _check_present(path)
    return read_json(path, f"tokenizer's {path.name}", ConfigError)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    _check_present(path)
    lines = read_text(path, "tokenizer's merges.txt", ConfigError).split("\n")
    if lines[-1] == "":
        lines.pop()
    merges = []
    for number, line in enumerate(lines, 1):
        if line.startswith("#version"):
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2 or "" in pair:
            raise ConfigError(f"{path} line {number} is {line!r}, not two tokens and a space; download it again.")
        merges.append(pair)
    return merges


def _added_token(value, special: bool) -> tuple[str, bool]:
    """(text, normalized) of a token written as a string or as an AddedToken dict.

    A string is matched in the raw text; a dict carries its own ``normalized`` flag (without one,
    AddedToken's default: ``not special``)."""
    if isinstance(value, str):
        return value, False
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise ConfigError(f"a special token must be a string or a dict with its content, not {value!r}.")
    for flag in ("lstrip", "rstrip", "single_word"):
        if value.get(flag):
            raise ConfigError(f"the added token {value['content']!r} sets {flag}, which SD's and SDXL's CLIP "
                              "tokenizers never do and this tokenizer does not implement.")
    return value["content"], bool(value.get("normalized", not value.get("special", special)))


def added_tokens(config: dict, special_map: dict, added_file: dict) -> tuple[dict[str, bool], dict[str, str]]:
    """The added tokens (text -> normalized) and the named ones (attribute -> text), resolved
    as transformers' from_pretrained does.

    A tokenizer_config.json with ``added_tokens_decoder`` (transformers >= 4.34) is read alone;
    an older one is overridden by special_tokens_map.json and completed by added_tokens.json. The
    listed added tokens keep their own flags; among named tokens of the same text, the last wins."""
    modern = "added_tokens_decoder" in config
    declared = {}
    for source in (config,) if modern else (config, special_map):
        declared.update({key: source[key] for key in _NAMED_TOKENS if source.get(key) is not None})
        if source.get("additional_special_tokens"):
            raise ConfigError("the tokenizer declares additional_special_tokens "
                                 f"{source['additional_special_tokens']}; SD's and SDXL's CLIP tokenizers have none.")
    named = {key: _added_token(value, special=True) for key, value in {**_DEFAULT_TOKENS, **declared}.items()}
    if modern:
        listed = dict(_added_token(value, special=False) for value in config["added_tokens_decoder"].values())
    else:
        specials = {_added_token(value, special=True)[0] for value in declared.values()}
        listed = {text: text not in specials for text in added_file}
    added = dict(named[key] for key in _NAMED_TOKENS if key in named)
    return {**added, **listed}, {key: text for key, (text, _) in named.items()}
