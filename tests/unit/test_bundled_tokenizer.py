"""CLIP's vocabulary that ships with mlx-unet: the data file, the tokenizer built from it, and the
folder files written from it. (tests/parity/test_bundled_vocabulary.py compares it with
transformers' CLIPTokenizer.)"""

import hashlib
import re
from importlib import resources

import pytest

from mlx_unet.errors import ConfigError
from mlx_unet.tokenizer import BUNDLED_MERGES, CLIPTokenizer, bundled_tokenizer_files

START, END = 49406, 49407  # CLIP's start and end of text: its two last ids


def test_the_data_file_is_the_one_its_readme_names():
    data = resources.files("mlx_unet").joinpath("data")
    readme = data.joinpath("README.md").read_text()
    digest = hashlib.sha256(data.joinpath(BUNDLED_MERGES).read_bytes()).hexdigest()
    assert re.search(rf"SHA-256: `{digest}`", readme)
    assert "MIT License" in readme and "Copyright (c) 2021 OpenAI" in readme and "github.com/openai/CLIP" in readme


@pytest.mark.parametrize("pad,pad_id", [("<|endoftext|>", END), ("!", 0)])
def test_ids_of_a_known_prompt(pad, pad_id):
    """"a photo of a cat" in CLIP's vocabulary (as openai/clip-vit-large-patch14 tokenizes it)."""
    ids = CLIPTokenizer.bundled(pad)(["a photo of a cat", ""])
    assert ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [START, 320, 1125, 539, 320, 2368, END]
    assert ids[1, :2].tolist() == [START, END]
    assert set(ids[0, 7:].tolist()) == set(ids[1, 2:].tolist()) == {pad_id}


def test_pad_token_is_matched_as_transformers_matches_it():
    """"!" as the pad token is an added token matched in the raw text, so "!!" is two of them
    rather than the merged "!!" word it is for the other tokenizer."""
    exclamations = CLIPTokenizer.bundled("<|endoftext|>").encode("wow!!")
    assert CLIPTokenizer.bundled("!").encode("wow!!") == exclamations[:1] + [0, 0]
    assert len(exclamations) == 2


def test_vocabulary_files(tmp_path):
    files = bundled_tokenizer_files("!")
    assert sorted(files) == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    merges = files["merges.txt"].decode().split("\n")
    assert merges[0] == "#version: 0.2" and merges[-1] == "" and len(merges) == 2 + 49408 - 512 - 2
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    prompts = ["A photo of a CAT, rainbow!!", "<|endoftext|> two  spaces ! more", "Crème brûlée 東京 🐱"]
    assert (CLIPTokenizer.from_folder(tmp_path)(prompts) == CLIPTokenizer.bundled("!")(prompts)).all()
    assert bundled_tokenizer_files("!") == files  # the same bytes every time


def test_a_pad_token_outside_the_vocabulary_is_refused():
    with pytest.raises(ConfigError, match=r"^pad token '<pad>' is not in CLIP's vocabulary; SD and SDXL pad with "
                                          r"'<\|endoftext\|>' or '!'\.$"):
        CLIPTokenizer.bundled("<pad>")
    with pytest.raises(ConfigError, match="is not in CLIP's vocabulary"):
        bundled_tokenizer_files("<pad>")


def test_a_folder_read_again_or_copied_reuses_its_parse_until_a_file_changes(tmp_path):
    first, copy = tmp_path / "first", tmp_path / "copy"
    for folder in (first, copy):
        folder.mkdir()
        for name, content in bundled_tokenizer_files("!").items():
            (folder / name).write_bytes(content)
    tokenizer = CLIPTokenizer.from_folder(first)
    assert CLIPTokenizer.from_folder(first) is tokenizer and CLIPTokenizer.from_folder(copy) is tokenizer
    config = (copy / "tokenizer_config.json").read_text()
    (copy / "tokenizer_config.json").write_text(config.replace('"model_max_length": 77', '"model_max_length": 20'))
    changed = CLIPTokenizer.from_folder(copy)
    assert changed is not tokenizer and changed.max_length == 20 and tokenizer.max_length == 77
    (copy / "tokenizer_config.json").write_text(config.replace('"model_max_length": 77', '"model_max_length": 1'))
    with pytest.raises(ConfigError, match="needs model_max_length, an integer of at least 2"):
        CLIPTokenizer.from_folder(copy)  # a bad file is refused, whatever was read before
    (copy / "added_tokens.json").write_text("{}")  # an optional file appearing is a change too
    (copy / "tokenizer_config.json").write_text(config)
    assert CLIPTokenizer.from_folder(copy) is not tokenizer
