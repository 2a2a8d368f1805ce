"""CLIP's vocabulary that ships with mlx-unet against transformers' CLIPTokenizer: loaded from
the files we write, and from a folder laid out as the published SD / SDXL repos have theirs
(tests/tokenizer_files.py, from the openai-clip package's copy of the same merges file)."""

import warnings

import pytest
from test_tokenizer import PROMPTS
from tokenizer_files import END, clip_vocab_and_merges, write_clip_tokenizer
from transformers import CLIPTokenizer as ReferenceTokenizer

from mlx_unet.tokenizer import CLIPTokenizer, bundled_tokenizer_files


def test_vocabulary_files_are_the_ones_built_from_the_openai_clip_package():
    vocab, merges = clip_vocab_and_merges()
    files = bundled_tokenizer_files()
    assert files["vocab.json"] == vocab.encode("utf-8") and files["merges.txt"] == merges.encode("utf-8")


def _ids(tokenizer: ReferenceTokenizer) -> list[list[int]]:
    return tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]


@pytest.mark.parametrize("pad", [END, "!"])
def test_bundled_tokenizer_tokenizes_as_transformers(tmp_path, pad):
    """SD 1.x's and SDXL's first tokenizer pad with end-of-text, SD 2.x's and SDXL's second with "!"."""
    for name, content in bundled_tokenizer_files(pad).items():
        (tmp_path / "ours" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "ours" / name).write_bytes(content)
    published = ReferenceTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "published", pad, "legacy"))
    from_ours = ReferenceTokenizer.from_pretrained(tmp_path / "ours")
    expected = _ids(published)
    assert published.convert_ids_to_tokens(published.pad_token_id) == pad
    assert _ids(from_ours) == expected  # transformers reads our files as the published ones
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts are cut, with a warning
        assert CLIPTokenizer.bundled(pad)(PROMPTS).tolist() == expected
