"""CLIP's byte-level BPE tokenizer, giving the ids SD's and SDXL's pipelines get from transformers.

Pure Python. ``CLIPTokenizer.from_folder`` reads a diffusers ``tokenizer/`` or ``tokenizer_2/``
folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json), or
``CLIPTokenizer.bundled`` uses CLIP's vocabulary that ships with the package, and calling it
gives what ``StableDiffusionXLPipeline.encode_prompt`` gets from transformers' CLIPTokenizer with
``padding="max_length", truncation=True``. That class (transformers 5, on the ``tokenizers``
library; ftfy plays no part) takes a prompt through these steps, as this module does:

1. added tokens (the special tokens, SDXL's second pad token "!") are cut out of the raw text:
   those marked ``normalized`` after step 2, the others before it;
2. each remaining piece is normalised: NFC, then lower case;
3. the piece is split into words by CLIP's pattern (letter runs, single digits, symbol runs,
   English contractions; white space dropped);
4. each word's UTF-8 bytes, written in GPT-2's printable byte alphabet with "</w>" on the last,
   are merged pair by pair in merges.txt's order;
5. start token, the first ``max_length - 2`` ids, end token, pad tokens.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import unicodedata
import warnings
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, InputError
from .tokenizer_folder import END_OF_TEXT, START_OF_TEXT, added_tokens, files_digest, read_folder


END_OF_WORD = "</w>"
# CLIP's BPE merges (OpenAI's bpe_simple_vocab_16e6.txt.gz, MIT license), shipped in mlx_unet/data:
# see the README there. Every SD and SDXL tokenizer has this vocabulary; only pad tokens differ.
BUNDLED_MERGES = "bpe_simple_vocab_16e6.txt.gz"
BUNDLED_DATA = Path(__file__).parent / "data"  # where it lies in a source tree (for messages)
_VOCAB_SIZE = 49408
# Folders parsed lately, by their files' digest: a pipeline loaded again, or a copy of its folder,
# reuses the parse (in pure Python, tens of milliseconds a tokenizer; SDXL loads two).
_RECENTLY_PARSED: dict[bytes, "CLIPTokenizer"] = {}
_RECENT_LIMIT = 4

# Unicode's White_Space property, which the `\s` of the tokenizers library's patterns matches.
# Python's str.isspace() is wider: it also counts U+001C..U+001F, which CLIP keeps as symbols.
_WHITE_SPACE = frozenset(map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                                    0x2028, 0x2029, 0x202F, 0x205F, 0x3000]))

# CLIP's pattern tries, at each position, these two literals, then the contractions, then a letter
# run, one digit, a symbol run. (The byte-level step then splits each literal in three again.)
_LITERALS = (START_OF_TEXT, END_OF_TEXT)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _byte_alphabet() -> list[str]:
    """GPT-2's character for each byte: printable Latin-1 bytes stand for themselves, the others
    (controls, space, soft hyphen) take U+0100 onwards in byte order, so no word holds a space."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    chars = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(moved)}}
    return [chars[b] for b in range(256)]


_BYTE_CHARS = _byte_alphabet()
_CHAR_BYTES = {c: b for b, c in enumerate(_BYTE_CHARS)}


def _normalize(text: str) -> str:
    """CLIP's normaliser: NFC, then lower case.

    Lower case goes character by character, as in Rust: str.lower() would turn a word-final
    capital sigma into "ς", the tokenizers library gives "σ". (The normaliser also turns runs of
    white space into one space; that changes nothing here, as white space only separates words,
    and no token in the vocabulary, so no added token, holds any.)"""
    return "".join(c.lower() for c in unicodedata.normalize("NFC", text))


def _kind(c: str) -> str:
    """'L' letter, 'N' number, ' ' white space or 'S' symbol, by Unicode general category."""
    if c in _WHITE_SPACE:
        return " "
    category = unicodedata.category(c)[0]
    return category if category in "LN" else "S"


def _split_words(text: str) -> list[str]:
    """The words CLIP's pattern finds in normalised text, white space dropped."""
    words = []
    i = 0
    while i < len(text):
        literal = next((s for s in _LITERALS if text.startswith(s, i)), None)
        contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
        kind = _kind(text[i])
        if literal:
            words += ["<|", literal[2:-2], "|>"]
            i += len(literal)
            continue
        if contraction:
            end = i + len(contraction)
        elif kind == " ":
            i += 1
            continue
        else:
            end = i + 1
            if kind != "N":  # a number is one digit; letters and symbols run on
                while end < len(text) and _kind(text[end]) == kind:
                    end += 1
        words.append(text[i:end])
        i = end
    return words


def _splitter(contents):
    """A function cutting text around any of ``contents``: [text, token, text, token, ..., text].

    The longest token wins where several start at one place, as in the tokenizers library."""
    if not contents:
        return lambda text: [text]
    alternatives = sorted(contents, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, alternatives)) + ")").split


class CLIPTokenizer:
    """CLIP's tokenizer: ``tokenizer(prompts)`` -> (batch, max_length) int32 ids, padded."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], added: dict[str, bool],
                 named: dict[str, str], max_length: int):
        """``added``: added token -> whether it is matched after normalisation; ``named``:
        "bos_token"/"eos_token"/"pad_token" -> its text. ``from_folder`` reads these from files."""
        self._vocab = vocab
        self._tokens = {i: token for token, i in vocab.items()}
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._added = {(_normalize(t) if normalized else t): vocab[t] for t, normalized in added.items()}
        self._split_raw = _splitter([t for t, normalized in added.items() if not normalized])
        self._split_normalized = _splitter([_normalize(t) for t, normalized in added.items() if normalized])
        self._cache: dict[str, list[int]] = {}
        self.max_length = max_length
        self.bos_token_id = vocab[named["bos_token"]]
        self.eos_token_id = vocab[named["eos_token"]]
        self.pad_token_id = vocab[named["pad_token"]]

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CLIPTokenizer":
        """Read a pipeline's ``tokenizer/`` or ``tokenizer_2/`` folder. A folder whose files are
        byte for byte those of one read lately gives that tokenizer again (it holds no state
        but a cache of words already split)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder; pass a pipeline's tokenizer/ or tokenizer_2/ folder.")
        digest = files_digest(folder)
        if digest in _RECENTLY_PARSED:
            return _RECENTLY_PARSED[digest]
        tokenizer = cls._from_contents(folder, *read_folder(folder))
        if digest is not None:
            _RECENTLY_PARSED[digest] = tokenizer
            if len(_RECENTLY_PARSED) > _RECENT_LIMIT:
                del _RECENTLY_PARSED[next(iter(_RECENTLY_PARSED))]  # the oldest
        return tokenizer

    @classmethod
    def bundled(cls, pad_token: str = END_OF_TEXT) -> "CLIPTokenizer":
        """CLIP's tokenizer from the vocabulary that ships with mlx-unet, padding with ``pad_token``:
        "<|endoftext|>" as SD 1.x's and SDXL's first tokenizer, or "!" as SD 2.x's and SDXL's second.
        It tokenizes as ``from_folder`` of the files ``bundled_tokenizer_files(pad_token)`` gives."""
        return cls._from_contents(BUNDLED_DATA, *_bundled_contents(pad_token), {})

    @classmethod
    def _from_contents(cls, folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], config: dict,
                       special_map: dict, added_file: dict) -> "CLIPTokenizer":
        """The tokenizer of a folder's files, parsed (``folder`` names them in messages)."""
        max_length = config.get("model_max_length")
        if type(max_length) is not int or max_length < 2:
            raise ConfigError(f"{folder / 'tokenizer_config.json'} needs model_max_length, an integer of at least 2 "
                                 f"(CLIP's is 77), not {max_length!r}.")
        for side in ("padding_side", "truncation_side"):
            if config.get(side, "right") != "right":
                raise ConfigError(f"{folder / 'tokenizer_config.json'} sets {side} to {config[side]!r}; "
                                     "SD's and SDXL's CLIP tokenizers pad and truncate on the right.")
        added, named = added_tokens(config, special_map, added_file)
        _check_vocab(folder, vocab, merges, added)
        return cls(vocab, merges, added, named, max_length)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without start and end tokens and uncut."""
        ids = []
        for i, raw in enumerate(self._split_raw(text)):
            if i % 2:
                ids.append(self._added[raw])
                continue
            for j, piece in enumerate(self._split_normalized(_normalize(raw))):
                if j % 2:
                    ids.append(self._added[piece])
                    continue
                for word in _split_words(piece):
                    ids += self._bpe(word)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids`` as transformers' CLIPTokenizer.decode writes it: word ends become spaces."""
        data = b"".join(_token_bytes(self._tokens[int(i)]) for i in ids)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """(batch, max_length) int32: start token, ids, end token, pad tokens. A prompt longer than
        ``max_length - 2`` tokens loses its tail (with a warning), the end token stays."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be a string or a non-empty list of strings, not {prompts!r}.")
        out = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int32)
        room = self.max_length - 2
        for row, prompt in zip(out, prompts):
            ids = self.encode(prompt)
            if len(ids) > room:
                warnings.warn(f"CLIP reads at most {self.max_length} tokens, so this prompt loses its last "
                              f"{len(ids) - room}: {self.decode(ids[room:])!r}", stacklevel=2)
                ids = ids[:room]
            row[: len(ids) + 2] = [self.bos_token_id, *ids, self.eos_token_id]
        return out

    def _bpe(self, word: str) -> list[int]:
        """Ids of one word: its byte characters, merged while some adjacent pair has a rank."""
        ids = self._cache.get(word)
        if ids is None:
            symbols = [_BYTE_CHARS[b] for b in word.encode("utf-8")]
            symbols[-1] += END_OF_WORD
            while len(symbols) > 1:
                pair = min(zip(symbols, symbols[1:]), key=lambda p: self._ranks.get(p, len(self._ranks)))
                if pair not in self._ranks:
                    break
                first, second = pair
                merged = symbols[:1]
                for symbol in symbols[1:]:
                    # left to right, so "a a a" merges as "aa a"; a merged symbol is never `first`
                    if merged[-1] == first and symbol == second:
                        merged[-1] += symbol
                    else:
                        merged.append(symbol)
                symbols = merged
            ids = self._cache[word] = [self._vocab[s] for s in symbols]
        return ids


@functools.lru_cache(maxsize=1)
def _bundled_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges, built from its merges file as CLIP builds them (and
    transformers' files hold them): the 256 byte characters, the same with "</w>", one token per
    merge in merge order (the first 49408 - 512 - 2 merges), then the start and end tokens."""
    data = resources.files("mlx_unet").joinpath("data").joinpath(BUNDLED_MERGES).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 1 names the file; the file holds more merges than CLIP's vocabulary has room for.
    merges = [tuple(line.split(" ")) for line in lines[1: 1 + _VOCAB_SIZE - 2 * len(_BYTE_CHARS) - 2]]
    # Code point order is CLIP's byte alphabet order: the printable bytes as themselves, then the moved ones.
    alphabet = sorted(_BYTE_CHARS)
    tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet), *(a + b for a, b in merges), *_LITERALS]
    return {token: i for i, token in enumerate(tokens)}, merges


def _bundled_contents(pad_token: str) -> tuple[dict[str, int], list[tuple[str, str]], dict, dict]:
    """The bundled tokenizer's vocabulary, merges, tokenizer_config.json and special_tokens_map.json,
    the last two as the published SD 1.x, 2.x and SDXL repos have them (transformers 4.2x wrote
    them): start, end and unknown tokens as "normalized" AddedTokens, the pad token as a plain
    string, so matched in the raw text."""
    vocab, merges = _bundled_vocabulary()
    if not isinstance(pad_token, str) or pad_token not in vocab:
        raise ConfigError(f"pad token {pad_token!r} is not in CLIP's vocabulary; SD and SDXL pad with "
                          f"{END_OF_TEXT!r} or '!'.")

    def token(text: str) -> dict:
        return {"content": text, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    start, end = _LITERALS
    named = {"bos_token": token(start), "eos_token": token(end), "unk_token": token(end)}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", "pad_token": pad_token,
              **{key: {"__type": "AddedToken", **value} for key, value in named.items()}}
    return vocab, merges, config, {**named, "pad_token": pad_token}


def bundled_tokenizer_files(pad_token: str = END_OF_TEXT) -> dict[str, bytes]:
    """A tokenizer folder's files (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) from the vocabulary that ships with mlx-unet, padding with
    ``pad_token`` (see ``CLIPTokenizer.bundled``)."""
    vocab, merges, config, special_map = _bundled_contents(pad_token)
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
        "merges.txt": "".join(["#version: 0.2\n", *(f"{a} {b}\n" for a, b in merges)]).encode("utf-8"),
        "tokenizer_config.json": json.dumps(config, indent=2).encode("utf-8"),
        "special_tokens_map.json": json.dumps(special_map, indent=2).encode("utf-8"),
    }


def _token_bytes(token: str) -> bytes:
    """A vocabulary token's bytes; one with a character outside the byte alphabet (as the
    tokenizers library's decoder does) stands for its own UTF-8."""
    if all(c in _CHAR_BYTES for c in token):
        return bytes(_CHAR_BYTES[c] for c in token)
    return token.encode("utf-8")


def _check_vocab(folder: Path, vocab: dict[str, int], merges, added: dict[str, bool]) -> None:
    """Every symbol BPE can produce, and every added token, must have an id."""
    alphabet = [c + end for c in _BYTE_CHARS for end in ("", END_OF_WORD)]
    for symbol in [*alphabet, *(a + b for a, b in merges), *added]:
        if symbol not in vocab:
            raise ConfigError(f"{folder / 'vocab.json'} lacks {symbol!r}, which merges.txt or the special tokens "
                                 "need; the files do not belong together, download the folder again.")
