"""Weighted and long prompts (A1111's syntax, pipelines.prompts) on tiny random pipelines, against
the same computation done here with transformers' CLIP text models and transformers' CLIPTokenizer:
each fragment tokenized, chunks of 75 tokens wrapped in start / end / pad tokens, every token's
states multiplied by its weight, each chunk scaled back to its unweighted mean, the chunks
concatenated along the tokens, the pooled embedding from the first chunk. The fragments and chunk
splits are written out here from the syntax's rules, not taken from our parser.

Also: an unweighted prompt is bit for bit what the pipeline computed before prompts were parsed
(the tokenizer's one 77-token row through the encoder), ``prompt_weighting=False`` reads the text
as written, ``max_tokens=77`` cuts with the tokenizer's warning, and identical prompts of a batch
are encoded once."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from image_runs import PROMPT
from pipeline_files import SIZE, diffusers_pipeline
from reference import relative_error
from sd_image_pipelines import converted_sd_pipeline

from mlx_unet import CLIPTextModel, InputError, load_pipeline
from mlx_unet.convert import convert

BOUND = 1e-5
UP, DOWN = 1.1, 1 / 1.1
LENGTH = 77


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return converted_sd_pipeline(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    pipe, folder = diffusers_pipeline(tmp, refiner=False)
    convert(folder, tmp / "mlx", dtype="float32", progress=False)
    return {"pipe": pipe, "mlx": tmp / "mlx"}


# ---------------------------------------------------------------------- the reference


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def chunk(tokenizer, fragments: list[tuple[str, float]]) -> tuple[list[int], list[float]]:
    """One chunk of (text, weight) fragments, each tokenized alone: 77 ids and weights."""
    tokens, weights = [], []
    for text, weight in fragments:
        fragment = ids(tokenizer, text)
        tokens += fragment
        weights += [weight] * len(fragment)
    assert len(tokens) <= LENGTH - 2
    pad = LENGTH - 2 - len(tokens)
    return ([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
            [1.0, *weights, 1.0] + [1.0] * pad)


@torch.no_grad()
def encode(encoder, chunks: list[tuple[list[int], list[float]]], layer: int, final_norm: bool):
    """transformers' encoder on one prompt's chunks: (weighted states (chunks * 77, width),
    the first chunk's pooled output)."""
    out = encoder(input_ids=torch.tensor([c for c, _ in chunks]), output_hidden_states=True)
    hidden = out.hidden_states[layer]
    if final_norm:
        hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    states = []
    for z, (_, weights) in zip(hidden.double(), chunks):
        weighted = z * torch.tensor(weights, dtype=torch.float64)[:, None]
        states.append(weighted * (z.mean() / weighted.mean()))
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return torch.cat(states).numpy(), pooled[0].double().numpy()


def sd_reference(pipe, chunks):
    return encode(pipe.text_encoder, chunks, -1, final_norm=True)[0]


def sdxl_reference(pipe, chunks_1, chunks_2):
    """(states of both encoders side by side, each weighted on its own; the second's pooled)."""
    first, _ = encode(pipe.text_encoder, chunks_1, -2, final_norm=False)
    second, pooled = encode(pipe.text_encoder_2, chunks_2, -2, final_norm=False)
    return np.concatenate([first, second], axis=-1), pooled


def check(ours: mx.array, reference: np.ndarray) -> None:
    error = relative_error(np.array(ours), reference[None])
    print(f"relative error {error:.1e}")
    assert error <= BOUND


def empty(tokenizer):
    return chunk(tokenizer, [])


# ---------------------------------------------------------------------- SD: one encoder


@pytest.mark.usefixtures("code_path")
def test_sd_weighted_prompt_matches_reference(sd1):
    pipe, tok = sd1["pipe"], sd1["pipe"].tokenizer
    prompt = "a (red:1.3) cat on a [mat], ((sunny)) day"
    fragments = [("a ", 1.0), ("red", 1.3), (" cat on a ", 1.0), ("mat", DOWN), (", ", 1.0), ("sunny", UP * UP),
                 (" day", 1.0)]
    negative = "blurry ((ugly:0.8) face"  # one bracket left open: x1.1 to the end
    ours = load_pipeline(sd1["mlx"], dtype=mx.float32).encode_prompt(prompt, negative)
    assert ours.pooled is None and ours.context.shape == (1, LENGTH, 24)
    expected = sd_reference(pipe, [chunk(tok, fragments)])
    check(ours.context, expected)
    check(ours.negative_context, sd_reference(pipe, [chunk(tok, [("blurry ", 1.0), ("ugly", 0.8 * UP),
                                                                 (" face", UP)])]))
    plain = sd_reference(pipe, [chunk(tok, [("a red cat on a mat, sunny day", 1.0)])])
    assert relative_error(expected[None], plain[None]) > 1e-2  # the weights change the states


def test_sd_long_prompts_are_chunked_at_the_comma_and_the_negative_padded(sd1):
    pipe, tok = sd1["pipe"], sd1["pipe"].tokenizer
    assert all(len(ids(tok, word)) == 1 for word in ("cat", "dog", "red", ","))
    # 60 cats, a comma (token 60: among the chunk's last 20), 30 dogs, red: the first chunk ends
    # at the comma, the rest starts the second.
    prompt = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 30) + " (red:1.2)"
    first = chunk(tok, [(" ".join(["cat"] * 60) + ",", 1.0)])
    second = chunk(tok, [(" ".join(["dog"] * 30) + " ", 1.0), ("red", 1.2)])
    mlx_pipe = load_pipeline(sd1["mlx"], dtype=mx.float32)
    ours = mlx_pipe.encode_prompt(prompt, "blurry")
    assert ours.context.shape == ours.negative_context.shape == (1, 2 * LENGTH, 24)
    check(ours.context, sd_reference(pipe, [first, second]))
    check(ours.negative_context, sd_reference(pipe, [chunk(tok, [("blurry", 1.0)]), empty(tok)]))
    # And the other way round: a long negative prompt pads the prompt.
    ours = mlx_pipe.encode_prompt("a cat", prompt)
    check(ours.context, sd_reference(pipe, [chunk(tok, [("a cat", 1.0)]), empty(tok)]))
    check(ours.negative_context, sd_reference(pipe, [first, second]))
    # A comma too early (token 50) to end the chunk: 75 tokens, then the rest.
    prompt = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)
    ours = mlx_pipe.encode_prompt(prompt, guided=False)
    check(ours.context, sd_reference(pipe, [chunk(tok, [(" ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 24), 1.0)]),
                                            chunk(tok, [(" ".join(["dog"] * 6), 1.0)])]))


# ---------------------------------------------------------------------- SDXL: two encoders


@pytest.mark.usefixtures("code_path")
def test_sdxl_weighted_long_prompt_and_prompt_2_match_reference(sdxl):
    pipe = sdxl["pipe"]
    tok_1, tok_2 = pipe.tokenizer, pipe.tokenizer_2
    assert tok_2.pad_token == "!"  # the second pads with "!", not the end token
    prompt = "a (red:1.3) cat BREAK on a [mat]"
    prompt_2 = "((dog)) " + " ".join(["dog"] * 80)  # 81 tokens: 75, then 6
    ours = load_pipeline(sdxl["mlx"], dtype=mx.float32).encode_prompt(prompt, "blurry, [ugly]", prompt_2=prompt_2)
    assert ours.context.shape == (1, 2 * LENGTH, 16 + 32) and ours.pooled.shape == (1, 40)
    context, pooled = sdxl_reference(
        pipe, [chunk(tok_1, [("a", 1.0), ("red", 1.3), (" cat", 1.0)]), chunk(tok_1, [("on a ", 1.0), ("mat", DOWN)])],
        [chunk(tok_2, [("dog", UP * UP), (" " + " ".join(["dog"] * 74), 1.0)]), chunk(tok_2, [("dog " * 6, 1.0)])])
    check(ours.context, context)
    check(ours.pooled, pooled)
    # The negative prompt serves both encoders; one chunk each, padded to the prompt's two.
    context, pooled = sdxl_reference(pipe, [chunk(tok_1, [("blurry, ", 1.0), ("ugly", DOWN)]), empty(tok_1)],
                                     [chunk(tok_2, [("blurry, ", 1.0), ("ugly", DOWN)]), empty(tok_2)])
    check(ours.negative_context, context)
    check(ours.negative_pooled, pooled)


def test_sdxl_prompt_2_longer_than_prompt_pads_the_first_encoder(sdxl):
    pipe = sdxl["pipe"]
    tok_1, tok_2 = pipe.tokenizer, pipe.tokenizer_2
    ours = load_pipeline(sdxl["mlx"], dtype=mx.float32).encode_prompt("(cat)", prompt_2="cat BREAK [dog]", guided=False)
    context, pooled = sdxl_reference(pipe, [chunk(tok_1, [("cat", UP)]), empty(tok_1)],
                                     [chunk(tok_2, [("cat", 1.0)]), chunk(tok_2, [("dog", DOWN)])])
    check(ours.context, context)
    check(ours.pooled, pooled)
    assert ours.negative_context is None


# ---------------------------------------------------------------------- today's path


def _plain_path(pipe, family, texts, clip_skip=None):
    """What the pipeline computed before prompts were parsed: each tokenizer's (B, 77) rows through
    its encoder in one call, as ``_encode`` did then (our tokenizer and our encoders)."""
    encoders, tokenizers = pipe.loaded_text_encoders, pipe.tokenizers
    if family == "sd1":
        hidden, _ = encoders[0](mx.array(tokenizers[0](texts)), hidden_layer=-1 - (clip_skip or 0))
        return encoders[0].text_model.final_layer_norm(hidden), None
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    (first, _), (second, pooled) = (e(mx.array(t(texts)), hidden_layer=layer) for e, t in zip(encoders, tokenizers))
    return mx.concatenate([first, second], axis=-1), pooled


def _same(ours, plain):
    assert (ours is None) == (plain is None)
    if ours is not None:
        assert np.array_equal(np.array(ours), np.array(plain))


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unweighted_prompts_are_bit_identical_to_the_plain_path(sd1, sdxl, family):
    pipe = load_pipeline({"sd1": sd1, "sdxl": sdxl}[family]["mlx"], dtype=mx.float32, keep_text_encoders=True)
    prompts, negatives = [PROMPT, "a cat: 50% off!"], ["blurry, low quality", ""]
    for clip_skip in (None, 1):
        ours = pipe.encode_prompt(prompts, negatives, clip_skip=clip_skip)
        context, pooled = _plain_path(pipe, family, prompts, clip_skip)
        _same(ours.context, context)
        _same(ours.pooled, pooled)
        context, pooled = _plain_path(pipe, family, negatives)
        _same(ours.negative_context, context)
        _same(ours.negative_pooled, pooled)


def test_prompt_weighting_false_reads_brackets_as_text(sd1):
    pipe = load_pipeline(sd1["mlx"], dtype=mx.float32, keep_text_encoders=True)
    text = "a (red:1.3) cat BREAK [mat]"
    assert ids(sd1["pipe"].tokenizer, "(")[0] in ids(sd1["pipe"].tokenizer, text)  # the brackets are tokens
    literal = pipe.encode_prompt(text, prompt_weighting=False, guided=False)
    assert literal.context.shape == (1, LENGTH, 24)
    _same(literal.context, _plain_path(pipe, "sd1", [text])[0])
    weighted = pipe.encode_prompt(text, guided=False)
    assert weighted.context.shape == (1, 2 * LENGTH, 24)  # BREAK made two chunks


def test_max_tokens_77_cuts_with_the_warning(sd1):
    pipe = load_pipeline(sd1["mlx"], dtype=mx.float32, keep_text_encoders=True)
    prompt = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = pipe.encode_prompt(prompt, "blurry", max_tokens=77)
    assert [str(w.message) for w in caught] == ["CLIP reads at most 77 tokens, so this prompt loses its last 16: "
                                                "'dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog'"]
    assert ours.context.shape == ours.negative_context.shape == (1, LENGTH, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _same(ours.context, _plain_path(pipe, "sd1", [prompt])[0])
    for bad in (76, 150):
        with pytest.raises(InputError, match=f"max_tokens must be None .* or 77 .*, not {bad}"):
            pipe.encode_prompt(prompt, max_tokens=bad)
        with pytest.raises(InputError, match="max_tokens must be None"):
            pipe(prompt, steps=1, max_tokens=bad)
    with pytest.raises(InputError, match="prompt_weighting must be True or False"):
        pipe.encode_prompt(prompt, prompt_weighting="yes")


def test_identical_prompts_are_encoded_once(sdxl, monkeypatch):
    pipe = load_pipeline(sdxl["mlx"], dtype=mx.float32)
    prompts, prompts_2 = ["a (cat)", "dog", "a (cat)", "a (cat)"], ["x", "x", "x", "y"]
    negatives = ["blurry", "blurry", "blurry", "ugly " * 80]  # the last one long: two chunks for all
    rows = []
    call = CLIPTextModel.__call__

    def counting(self, input_ids, hidden_layer=-2):
        rows.append(input_ids.shape[0])
        return call(self, input_ids, hidden_layer)

    monkeypatch.setattr(CLIPTextModel, "__call__", counting)
    batch = pipe.encode_prompt(prompts, negatives, prompt_2=prompts_2)
    # Three distinct (prompt, prompt_2) pairs and two negatives, two chunks each, per encoder.
    assert rows == [3 * 2, 3 * 2, 2 * 2, 2 * 2]
    empty = pipe.encode_prompt("", guided=False).context  # the chunk the shorter ones are padded with
    for i in range(4):
        alone = pipe.encode_prompt(prompts[i], negatives[i], prompt_2=prompts_2[i])
        for name in ("context", "pooled", "negative_context", "negative_pooled"):
            one, expected = getattr(batch, name)[i: i + 1], getattr(alone, name)
            if one.ndim == 3 and one.shape[1] > expected.shape[1]:  # padded to the batch's two chunks
                expected = mx.concatenate([expected, empty], axis=1)
            assert relative_error(np.array(one), np.array(expected)) <= 1e-6, (i, name)
    assert np.array_equal(np.array(batch.context[0]), np.array(batch.context[2]))


def test_a_long_prompt_runs_and_the_keywords_reach_a_refiner(sdxl, monkeypatch):
    """SDXL without a negative prompt conditions on zeros of the prompt's (two-chunk) shape."""
    pipe = load_pipeline(sdxl["mlx"], dtype=mx.float32)
    prompt = "(cat:1.2) " + " ".join(["dog"] * 80)
    run = dict(steps=2, height=SIZE, width=SIZE, seed=0, output="latent")
    latents = pipe(prompt, **run)
    assert latents.shape == (1, SIZE // 8, SIZE // 8, 4) and bool(mx.all(mx.isfinite(latents)))
    refiner = load_pipeline(sdxl["mlx"], dtype=mx.float32)
    asked = {}

    class Stop(Exception):
        pass

    def encode_prompt(*args, **kwargs):
        asked.update(kwargs)
        raise Stop

    monkeypatch.setattr(refiner, "encode_prompt", encode_prompt)
    # The base's own encoding warns first: 87 tokens, with the brackets read as text.
    with pytest.raises(Stop), pytest.warns(UserWarning, match="loses its last 12"):
        pipe(prompt, refiner=refiner, prompt_weighting=False, max_tokens=77, **run)
    assert asked["prompt_weighting"] is False and asked["max_tokens"] == 77
