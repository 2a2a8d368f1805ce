"""Real CLIP tokenizer folders for tests, written from CLIP's own merges file.

No test may download from the Hub, so the vocabulary comes from a PyPI package: openai-clip (a
test dependency; it needs only ftfy, regex and tqdm, not torchvision, whose PyPI wheel does not
load next to the CPU build of torch) ships OpenAI's ``bpe_simple_vocab_16e6.txt.gz``. From it the
folder is built as CLIP builds its vocabulary and transformers' files hold it: the 256 byte
characters, the same with "</w>", the first 48894 merges, then the start and end tokens.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode

CLIP_MERGES = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary size 49408, less the 512 byte symbols and the two special tokens.
MERGE_COUNT = 49408 - 512 - 2
START, END = "<|startoftext|>", "<|endoftext|>"

# How SDXL repositories write their tokenizer_config.json and special_tokens_map.json:
# "legacy" as stable-diffusion-xl-base-1.0 (saved by transformers 4.31), "modern" as later ones
# with added_tokens_decoder (e.g. sdxl-turbo); "added_tokens_json" adds a legacy added_tokens.json
# with two non-special words, one the start of the other; "bare" names no special token
# (CLIPTokenizer's defaults apply).
LAYOUTS = ("legacy", "modern", "added_tokens_json", "bare")
ADDED_WORDS = ("rain", "rainbow")


def clip_merges_file() -> Path:
    spec = importlib.util.find_spec("clip")  # finds the package without importing it (that needs torch)
    path = Path(spec.submodule_search_locations[0]) / CLIP_MERGES if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"CLIP's {CLIP_MERGES} is missing: the openai-clip package ships it; "
                                'install the test dependencies with pip install -e ".[test]".')
    return path


@functools.lru_cache(maxsize=None)
def clip_vocab_and_merges() -> tuple[str, str]:
    """(vocab.json, merges.txt) contents."""
    lines = gzip.decompress(clip_merges_file().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1: 1 + MERGE_COUNT]  # the first line names the file
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges] + [START, END]
    vocab = {token: i for i, token in enumerate(tokens)}
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges) + "\n"


def _token(content: str, normalized: bool, **extra) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, **extra}


def write_clip_tokenizer(folder: Path, pad_token: str = END, layout: str = "modern") -> Path:
    """An SDXL ``tokenizer/`` (pad "<|endoftext|>") or ``tokenizer_2/`` (pad "!") folder."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    config = {"add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    if layout == "modern":
        added = {"49406": _token(START, True, special=True), "49407": _token(END, False, special=True)}
        if pad_token != END:
            added = {"0": _token(pad_token, False, special=True), **added}
        config.update(added_tokens_decoder=added, additional_special_tokens=[], bos_token=START, eos_token=END,
                      pad_token=pad_token, unk_token=END)
        special_map = {"bos_token": _token(START, True), "eos_token": _token(END, True),
                       "pad_token": _token(pad_token, pad_token == END), "unk_token": _token(END, True)}
    elif layout in ("legacy", "added_tokens_json"):
        config.update({key: {"__type": "AddedToken", **_token(text, True)}
                       for key, text in (("bos_token", START), ("eos_token", END), ("unk_token", END))})
        config["pad_token"] = pad_token
        special_map = {"bos_token": _token(START, True), "eos_token": _token(END, True), "pad_token": pad_token,
                       "unk_token": _token(END, True)}
        if layout == "added_tokens_json":
            vocab_ids = json.loads(vocab)
            added_tokens = {t: vocab_ids[t] for t in (START, END, *ADDED_WORDS)}
            (folder / "added_tokens.json").write_text(json.dumps(added_tokens), encoding="utf-8")
    elif layout == "bare":
        if pad_token != END:
            raise ValueError("a bare folder names no pad token, so it pads with CLIPTokenizer's default")
        special_map = None
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    return folder
