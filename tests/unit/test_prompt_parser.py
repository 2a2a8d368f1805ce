"""A1111's prompt syntax (pipelines.prompts): the fragments and weights a prompt parses to, the
chunks its tokens are split into, and the weighting of states. The expected values are stated
here from the rules in the module's docstring. (tests/parity/test_prompt_weighting.py checks the
embeddings against transformers' encoders.)"""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_unet.errors import InputError
from mlx_unet.pipelines.prompts import (BREAK, PromptTokens, apply_weights, batch_tokens, check_max_tokens,
                                        chunk_tokens, gather, parse_prompt, tokenize_prompt, unique)
from mlx_unet.tokenizer import CLIPTokenizer

START, END, COMMA = 49406, 49407, 267  # CLIP's start and end of text, and ",</w>"
UP, DOWN = 1.1, 1 / 1.1

PARSED = [
    ("a photo of a cat", [("a photo of a cat", 1.0)]),
    ("(a)", [("a", UP)]),
    ("((a))", [("a", UP * UP)]),
    ("[a]", [("a", DOWN)]),
    ("[[a]]", [("a", DOWN * DOWN)]),
    ("(a:1.3)", [("a", 1.3)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("x (a:1.3) y", [("x ", 1.0), ("a", 1.3), (" y", 1.0)]),
    ("((a:1.5) b)", [("a", 1.5 * UP), (" b", UP)]),  # nested factors multiply
    ("a (b [c] d) e", [("a ", 1.0), ("b ", UP), ("c", DOWN * UP), (" d", UP), (" e", 1.0)]),
    ("([a:2])", [("a:2", DOWN * UP)]),  # a weight needs a round bracket: "[a:2]" is text
    # Escapes: the bracket or backslash itself; another backslash stays as it is.
    (r"\(a\)", [("(a)", 1.0)]),
    (r"\[a\] (b\))", [("[a] ", 1.0), ("b)", UP)]),
    (r"a\\b", [("a\\b", 1.0)]),
    (r"a\b", [("a\\b", 1.0)]),
    # Unbalanced: an open bracket weights the rest; a closing one that closes nothing is text.
    ("(a", [("a", UP)]),
    ("x [a", [("x ", 1.0), ("a", DOWN)]),
    ("((a) b", [("a", UP * UP), (" b", UP)]),
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("a:1.3)", [("a:1.3)", 1.0)]),
    ("(a] b)", [("a] b", UP)]),
    # Weights: spaces around the number are allowed; no exponent; sign and bare point are.
    ("(a : 1.3)", [("a ", 1.3)]),
    ("(a:1e1)", [("a:1e1", UP)]),
    ("(a:1.)", [("a", 1.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:)", [("a:", UP)]),
    ("x:y", [("x:y", 1.0)]),
    # Adjacent fragments of equal weight merge (into one word here, as A1111 reads it too).
    ("(a)(b)", [("ab", UP)]),
    ("() a", [(" a", 1.0)]),
    # BREAK: an upper-case word of its own, anywhere, its white space with it.
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b:1.2)", [("a", 1.2), BREAK, ("b", 1.2)]),
    ("BREAK a", [BREAK, ("a", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), BREAK, (",b", 1.0)]),
    ("BREAKfast", [("BREAKfast", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("A_BREAK", [("A_BREAK", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text,expected", PARSED, ids=[t or "empty" for t, _ in PARSED])
def test_parse(text, expected):
    parsed = parse_prompt(text)
    assert [p for p, _ in parsed] == [p for p, _ in expected]
    assert [w for _, w in parsed] == [None if w is None else pytest.approx(w, rel=1e-12) for _, w in expected]


def test_plain_text_parses_to_itself():
    text = "a photo of an astronaut riding a horse, 35mm: ultra-detailed; 50% off! <|endoftext|>"
    assert parse_prompt(text) == [(text, 1.0)]


# ---------------------------------------------------------------------- chunks


def _ids(chunks):
    return [ids for ids, _ in chunks]


def test_chunks_of_75():
    tokens = list(range(160))
    assert _ids(chunk_tokens([(tokens, 1.0)], COMMA)) == [tokens[:75], tokens[75:150], tokens[150:]]
    assert _ids(chunk_tokens([(tokens[:150], 1.0)], COMMA)) == [tokens[:75], tokens[75:150]]  # no empty third
    assert chunk_tokens([([], 1.0)], COMMA) == [([], [])]
    assert chunk_tokens([], COMMA) == [([], [])]


@pytest.mark.parametrize("comma,first", [(60, 61), (55, 56), (74, 75), (54, 75), (10, 75)])
def test_a_comma_in_the_last_20_tokens_ends_the_chunk(comma, first):
    """80 tokens with one comma: the first chunk ends after it when it is among tokens 55..74."""
    tokens = [1000 + i for i in range(80)]
    tokens[comma] = COMMA
    chunks = chunk_tokens([(tokens[:40], 1.0), (tokens[40:], 2.0)], COMMA)
    assert _ids(chunks) == [tokens[:first], tokens[first:]]
    # The moved tokens keep their weights.
    assert chunks[1][1] == [1.0 if i < 40 else 2.0 for i in range(first, 80)]


def test_the_last_comma_counts_and_a_comma_arriving_at_a_full_chunk_starts_the_next():
    tokens = [1000 + i for i in range(80)]
    tokens[58] = tokens[70] = COMMA
    assert _ids(chunk_tokens([(tokens, 1.0)], COMMA)) == [tokens[:71], tokens[71:]]
    tokens = [1000 + i for i in range(80)]
    tokens[60] = tokens[75] = COMMA  # the 76th token is a comma: the chunk closes as it is
    assert _ids(chunk_tokens([(tokens, 1.0)], COMMA)) == [tokens[:75], tokens[75:]]


def test_the_comma_rule_applies_to_every_chunk_and_can_be_off():
    tokens = [1000 + i for i in range(170)]
    tokens[70] = COMMA  # the first chunk ends after 71 tokens
    tokens[71 + 60] = COMMA  # the second chunk's token 60: it ends there too
    assert _ids(chunk_tokens([(tokens, 1.0)], COMMA)) == [tokens[:71], tokens[71:132], tokens[132:]]
    assert _ids(chunk_tokens([(tokens, 1.0)], COMMA, backtrack=0)) == [tokens[:75], tokens[75:150], tokens[150:]]


def test_break_ends_a_chunk():
    a, b = [1, 2, 3], [4, 5]
    assert chunk_tokens([(a, 1.0), None, (b, 1.5)], COMMA) == [(a, [1.0] * 3), (b, [1.5] * 2)]
    assert _ids(chunk_tokens([None, (a, 1.0)], COMMA)) == [[], a]  # an empty chunk first
    assert _ids(chunk_tokens([(a, 1.0), None, None, (b, 1.0)], COMMA)) == [a, [], b]
    assert _ids(chunk_tokens([(a, 1.0), None], COMMA)) == [a]  # nothing after: no empty chunk
    full = list(range(75))
    assert _ids(chunk_tokens([(full, 1.0), None, (b, 1.0)], COMMA)) == [full, b]  # a full chunk, not an empty one


# ---------------------------------------------------------------------- tokens


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"])
def tokenizer(request):
    return CLIPTokenizer.bundled(request.param)


def test_a_plain_prompt_gives_the_tokenizers_ids(tokenizer):
    for text in ("a photo of a cat, (not really)", "", "x " * 75):
        tokens = tokenize_prompt(tokenizer, text, weighting=False)
        assert np.array_equal(tokens.ids, tokenizer([text]))
        assert np.all(tokens.weights == 1)
    text = "a photo of an astronaut riding a horse, 35mm"
    assert np.array_equal(tokenize_prompt(tokenizer, text).ids, tokenizer([text]))


def test_weights_and_brackets(tokenizer):
    tokens = tokenize_prompt(tokenizer, "a (photo:1.5) of [cat]")
    a, photo, of, cat = (tokenizer.encode(w)[0] for w in ("a", "photo", "of", "cat"))
    assert tokens.ids.shape == (1, 77)
    assert tokens.ids[0, :6].tolist() == [START, a, photo, of, cat, END]
    assert tokens.weights[0, :6] == pytest.approx([1, 1, 1.5, 1, DOWN, 1])
    assert np.all(tokens.weights[0, 6:] == 1)
    literal = tokenize_prompt(tokenizer, "a (photo:1.5)", weighting=False)
    assert literal.ids[0, 1: 1 + len(tokenizer.encode("a (photo:1.5)"))].tolist() == tokenizer.encode("a (photo:1.5)")
    assert tokenizer.encode("(")[0] in literal.ids[0]


def test_long_prompts_are_chunked_with_start_end_and_pad(tokenizer):
    text = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 30)  # comma at token 60
    tokens = tokenize_prompt(tokenizer, text)
    cat, dog = tokenizer.encode("cat")[0], tokenizer.encode("dog")[0]
    assert tokens.ids.shape == (2, 77)
    assert tokens.ids[0].tolist() == [START, *[cat] * 60, COMMA, END] + [tokenizer.pad_token_id] * 14
    assert tokens.ids[1].tolist() == [START, *[dog] * 30, END] + [tokenizer.pad_token_id] * 45
    tokens = tokenize_prompt(tokenizer, "cat BREAK dog")
    assert tokens.ids[:, :3].tolist() == [[START, cat, END], [START, dog, END]]
    assert tokens.ids[:, 3].tolist() == [tokenizer.pad_token_id] * 2


def test_max_tokens_77_cuts_with_the_tokenizers_warning(tokenizer):
    text = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 30)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        tokens = tokenize_prompt(tokenizer, text, max_tokens=77)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        expected = tokenizer([text])
    assert np.array_equal(tokens.ids, expected)  # the first 75 tokens, whatever the commas
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert "loses its last 16" in str(ours[0].message)
    with warnings.catch_warnings(record=True) as none:
        warnings.simplefilter("always")
        tokenize_prompt(tokenizer, "cat", max_tokens=77)
    assert not none


def test_batches_are_padded_with_empty_chunks(tokenizer):
    one = tokenize_prompt(tokenizer, "(cat)")
    three = tokenize_prompt(tokenizer, "a BREAK b BREAK c")
    batch = batch_tokens([one, three], 3, tokenizer)
    empty = tokenizer([""])[0]
    assert batch.ids.shape == batch.weights.shape == (2, 3, 77)
    assert np.array_equal(batch.ids[0, 0], one.ids[0]) and np.array_equal(batch.ids[1], three.ids)
    assert np.array_equal(batch.ids[0, 1], empty) and np.array_equal(batch.ids[0, 2], empty)
    assert batch.weights[0, 0, 1] == pytest.approx(UP) and np.all(batch.weights[0, 1:] == 1)


@pytest.mark.parametrize("value", [76, 78, 150, 0, "77", 77.0, True])
def test_max_tokens_is_none_or_77(value):
    check_max_tokens(None)
    check_max_tokens(77)
    with pytest.raises(InputError, match=r"max_tokens must be None .* or 77 .*, not"):
        check_max_tokens(value)


# ---------------------------------------------------------------------- weighting


def test_weights_multiply_tokens_and_restore_each_chunks_mean():
    rng = np.random.default_rng(0)
    states = rng.standard_normal((3, 77, 8)).astype(np.float32) + 0.3
    weights = np.ones((3, 77), dtype=np.float32)
    weights[0, 3] = 1.5
    weights[2, 5:9] = 0.7
    out = np.array(apply_weights(mx.array(states), weights))
    for row in range(3):
        expected = states[row] * weights[row][:, None]
        expected *= states[row].mean() / expected.mean()
        np.testing.assert_allclose(out[row], expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(out[1], states[1])  # a chunk without weights: bit for bit
    unweighted = mx.array(states)
    assert apply_weights(unweighted, np.ones((3, 77), np.float32)) is unweighted
    half = apply_weights(mx.array(states).astype(mx.float16), weights)
    assert half.dtype == mx.float16


def test_unique_and_gather():
    items = [("a", "x"), ("b", "x"), ("a", "x"), ("a", "y")]
    firsts, index = unique(items)
    assert firsts == [("a", "x"), ("b", "x"), ("a", "y")] and index == [0, 1, 0, 2]
    rows = mx.array([[0.0], [1.0], [2.0]])
    assert gather(rows, index).tolist() == [[0.0], [1.0], [0.0], [2.0]]
    assert gather(rows, [0, 1, 2]) is rows and gather(None, index) is None


def test_prompt_tokens_is_plain_data():
    tokens = PromptTokens(np.zeros((1, 77), np.int32), np.ones((1, 77), np.float32))
    assert tokens.ids.shape == tokens.weights.shape
