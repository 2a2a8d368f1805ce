"""The CLIP tokenizer against transformers' CLIPTokenizer built from the same files.

The files are CLIP's real vocabulary (tests/tokenizer_files.py), laid out as SDXL repositories
have them, with both pad tokens; the reference is called as diffusers' encode_prompt calls it.
"""

import json
import random
import re
import warnings

import numpy as np
import pytest
from tokenizer_files import ADDED_WORDS, END, write_clip_tokenizer
from transformers import CLIPTokenizer as ReferenceTokenizer

from mlx_unet.errors import ConfigError, InputError
from mlx_unet.tokenizer import CLIPTokenizer

PHRASES = [
    "a photo of an astronaut riding a horse on mars",
    "A majestic LION at golden hour; 35mm film, f/1.8 -- ultra detailed!!!",
    "don't stop: it's what we'll do, they've said; I'm sure he'd agree, you're right",
    "DON'T SHOUT, IT'S LOUD. 'quoted' ''double'' ’curly’ rock'n'roll o'clock '",
    "Crème brûlée à la façon de Noël, naïve coöperation",
    "cafe\u0301 (decomposed) vs café, A\u030a vs Å, n\u0303",  # NFC composes these
    "ΟΔΟΣ ΣΟΦΟΣ Σ σς",  # lower case without the final-sigma rule
    "İstanbul'da IĞDIR ıi, Straße GROSS ß ẞ, ǅemal ǲ, Kelvin \u212a \u2126",
    "東京タワーの夜景、高精細 한국어 프롬프트 Москва зимой, مرحبا بالعالم, हिन्दी ไทย",
    "🐱\u200d👤 ninja cat 👍🏽 🇫🇷 ❤️ ✨✨",
    "1234567890 3.14159 1,000,000 2024-01-01 ½ ² Ⅻ ٣٤ １２",
    "multiple   spaces\n\nnew lines\t\ttabs \r\n crlf \x0b\x0c",
    "\xa0nbsp\u2003em\u3000ideographic\u200bzero width\u205fmath\u2028line\x85nel",
    "ctrl\x1cchars\x1fhere\x00nul\x7fdel\x1b[0m",  # U+001C..U+001F are not white space to CLIP
    "ﬁne ﬂour ligatures ＦＵＬＬＷＩＤＴＨ",
    "<|endoftext|> <|ENDOFTEXT|> <|startoftext|>x<|StartOfText|> <|endoftext|>?! a<|endoftext|>b",
    "!!! ! !? ?! (!) wow!, 'hi'! !<|endoftext|>",
    "rainbow rain Rainbows RAINBOW brainbow rainbo rai",
    "email@example.com http://x.y/z?q=1&r=2 #hashtag $100 50% C++ c# f(x)=y^2 snake_case kebab-case",
    "masterpiece, best quality, (detailed face:1.2), [blurry], <lora:style:0.8>, 8k uhd, dslr",
    "", " ", "\n", "a", "A.", "'s", "'S'LL'D", "--", "\u0301",
]
PIECES = " ".join(PHRASES).split() + ["<|endoftext|>", "<|startoftext|>", "!", "'s", "'ll", *ADDED_WORDS]
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", "", ", ", "!", "' ", " \n\t "]
SOUP = "aZé\u0301ß'’sStTlLdD!?.,<|>/-_0129²½ⅫΣς日🐱\u200d🏽 \t\n\xa0\u3000\x1c\x85İ"


def _prompts(count: int = 300) -> list[str]:
    """Fixed phrases, random mixes of their words, character soup, and prompts too long for CLIP."""
    rng = random.Random(6)
    prompts = list(PHRASES)
    while len(prompts) < count:
        style = rng.random()
        if style < 0.2:
            prompts.append("".join(rng.choice(SOUP) for _ in range(rng.randint(1, 40))))
            continue
        n = rng.randint(60, 150) if style > 0.9 else rng.randint(1, 25)
        case = rng.choice([str, str.upper, str.title, str.lower])
        prompts.append("".join(case(rng.choice(PIECES)) + rng.choice(SEPARATORS) for _ in range(n)))
    return prompts


PROMPTS = _prompts()
FOLDERS = [("legacy", END), ("legacy", "!"), ("modern", END), ("modern", "!"), ("added_tokens_json", "!"),
           ("bare", END)]


@pytest.fixture(scope="module", params=FOLDERS, ids=[f"{layout}-pad{pad}" for layout, pad in FOLDERS])
def tokenizers(request, tmp_path_factory):
    layout, pad = request.param
    folder = write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"), pad, layout)
    reference = ReferenceTokenizer.from_pretrained(folder)
    # diffusers' pipelines get this class; before transformers 5 CLIPTokenizer was a Python one
    # (with ftfy when installed), which normalises text differently
    assert reference.is_fast, "the reference is transformers >= 5's CLIPTokenizer, on the tokenizers library"
    return CLIPTokenizer.from_folder(folder), reference, pad


def _first_difference(ours: list, reference: list) -> str:
    row = next(i for i, (a, b) in enumerate(zip(ours, reference)) if a != b)
    return f"prompt {PROMPTS[row]!r}: ours {ours[row]!r}, transformers {reference[row]!r}"


def test_ids_match_transformers(tokenizers):
    ours, reference, pad = tokenizers
    assert (ours.max_length, ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (
        reference.model_max_length, reference.pad_token_id, reference.bos_token_id, reference.eos_token_id)
    assert reference.convert_ids_to_tokens(ours.pad_token_id) == pad  # both pad tokens really are tested

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts are cut; test_truncation checks the warning
        ids = ours(PROMPTS)
    expected = reference(PROMPTS, padding="max_length", max_length=reference.model_max_length,
                         truncation=True)["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    assert ids.tolist() == expected, _first_difference(ids.tolist(), expected)

    encoded = [ours.encode(p) for p in PROMPTS]
    expected = reference(PROMPTS, add_special_tokens=False)["input_ids"]
    assert encoded == expected, _first_difference(encoded, expected)
    assert max(map(len, encoded)) > 150  # some prompts really were cut

    decoded, expected = [ours.decode(ids) for ids in encoded], reference.batch_decode(encoded)
    assert decoded == expected, _first_difference(decoded, expected)


@pytest.mark.parametrize("layout", ["legacy", "modern"])
def test_special_tokens_map_counts_only_without_added_tokens_decoder(tmp_path, layout):
    """tokenizer_2's files with tokenizer's special_tokens_map.json: an older tokenizer_config.json
    gives way to it (pad "<|endoftext|>"), one with added_tokens_decoder does not (pad "!")."""
    folder = write_clip_tokenizer(tmp_path / "tokenizer_2", "!", layout)
    other = write_clip_tokenizer(tmp_path / "tokenizer", END, layout)
    (folder / "special_tokens_map.json").write_bytes((other / "special_tokens_map.json").read_bytes())
    ours, reference = CLIPTokenizer.from_folder(folder), ReferenceTokenizer.from_pretrained(folder)
    assert ours.pad_token_id == reference.pad_token_id
    assert reference.convert_ids_to_tokens(ours.pad_token_id) == (END if layout == "legacy" else "!")
    expected = reference(PHRASES, padding="max_length", max_length=77, truncation=True)["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours(PHRASES).tolist() == expected


def test_truncation_keeps_the_end_token_and_warns(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "tokenizer_2", "!")
    ours, reference = CLIPTokenizer.from_folder(folder), ReferenceTokenizer.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ours("a " * 75)[0, -1] == ours.eos_token_id  # 75 tokens fill the row uncut

    for prompt in ["a " * 76, " ".join(PHRASES)]:
        with pytest.warns(UserWarning) as caught:
            ids = ours([prompt, "short"])
        assert len(caught) == 1 and ids[0, -1] == ours.eos_token_id
        # what diffusers' encode_prompt reports as cut off
        untruncated = reference(prompt, padding="longest", return_tensors="np").input_ids
        removed = reference.batch_decode(untruncated[:, reference.model_max_length - 1: -1])[0]
        dropped = untruncated.shape[1] - reference.model_max_length
        assert f"loses its last {dropped}: {removed!r}" in str(caught[0].message)


def _json_edit(change):
    """A text edit of a JSON file: ``change`` alters its parsed contents in place."""
    def edit(text):
        data = json.loads(text)
        change(data)
        return json.dumps(data)
    return edit


BAD_FOLDERS = {
    "no vocab": ("vocab.json", None, "vocab.json is missing"),
    "no config": ("tokenizer_config.json", None, "tokenizer_config.json is missing"),
    "vocab not JSON": ("vocab.json", lambda text: text[:-10], "is not valid JSON"),
    "vocab ids not ints": ("vocab.json", _json_edit(lambda v: v.update(a="1")), "map each token to an integer id"),
    "merge line": ("merges.txt", lambda text: text.replace("i n\n", "i n x\n", 1), "line 2 is 'i n x'"),
    "merge not in vocab": ("vocab.json", _json_edit(lambda v: v.pop("in")), "lacks 'in'"),
    "pad not in vocab": ("tokenizer_config.json", _json_edit(lambda c: c.update(pad_token="<pad>")), "lacks '<pad>'"),
    "no max length": ("tokenizer_config.json", _json_edit(lambda c: c.pop("model_max_length")), "model_max_length"),
    "left padding": ("tokenizer_config.json", _json_edit(lambda c: c.update(padding_side="left")), "padding_side"),
    "lstrip": ("tokenizer_config.json",
               _json_edit(lambda c: c["added_tokens_decoder"]["0"].update(lstrip=True)), "sets lstrip"),
    "extra tokens": ("tokenizer_config.json",
                     _json_edit(lambda c: c.update(additional_special_tokens=["<x>"])), "additional_special_tokens"),
}


def test_bad_folder_is_refused_clearly(tmp_path):
    for name, (file, edit, message) in BAD_FOLDERS.items():
        folder = write_clip_tokenizer(tmp_path / name, "!")
        CLIPTokenizer.from_folder(folder)  # the intact folder loads
        path = folder / file
        if edit is None:
            path.unlink()
        else:
            path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")
        with pytest.raises(ConfigError, match=re.escape(message)):
            CLIPTokenizer.from_folder(folder)


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    tokenizer = CLIPTokenizer.from_folder(write_clip_tokenizer(tmp_path / "tokenizer"))
    for prompts in ([], None, ["a", 3], b"bytes"):
        with pytest.raises(InputError, match="prompts must be a string or a non-empty list of strings"):
            tokenizer(prompts)
