"""Prompts as people write them for Stable Diffusion: AUTOMATIC1111's emphasis syntax, prompts
longer than CLIP's 77 tokens, and the weighting of the encoders' states.

The syntax (written from A1111's documented rules, not its code):

- ``(text)`` multiplies the attention to ``text`` by 1.1, ``[text]`` divides it by 1.1, and
  ``(text:1.3)`` sets the factor (a decimal number, sign allowed: ``1``, ``1.``, ``.5``, ``-0.2``;
  spaces around it are allowed; ``1e1`` is not a number here, so ``(a:1e1)`` is the text
  ``a:1e1`` at 1.1). Nested brackets multiply their factors.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; any other backslash is itself.
- A bracket left open weights the rest of the prompt; a closing bracket with none open, and a
  ``:`` not followed by a number and ``)``, are literal text.
- ``BREAK``, as a whole word in capitals, ends the current chunk of 75 tokens (padding it) so
  that what follows starts a new one.

A prompt is split into chunks of 75 tokens, each encoded with its start and end tokens as its
own 77-token sequence, and the states are concatenated along the tokens (the UNet's
cross-attention takes any number of them). Where a chunk fills up, the tokens after its last
comma move to the next chunk when that comma is among its last 20 tokens, so a phrase is not cut
in two. Each token's states are multiplied by its weight, then the chunk is scaled back to its
unweighted mean (A1111's rule).

A pipeline's prompts (``encode_sides``): the prompt's side and the negative prompt's, each
distinct prompt encoded once, padded to the same number of chunks, into ``PromptEmbeddings``.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..errors import InputError, PipelineError
from .preflight import check_prompts

BREAK = ("BREAK", None)  # the fragment ``parse_prompt`` gives for a BREAK
EMPHASIS = 1.1  # the factor of one pair of brackets
COMMA_BACKTRACK = 20  # how far back from a chunk's end a comma may lie to end the chunk there
CLIP_TOKENS = 77  # the only max_tokens besides None: today's single sequence, cut

# One syntax element at a time: an escape, an opening bracket, ":number)" (which closes a round
# bracket with that weight), a closing bracket, a run of plain text, or a lone ":" or "\".
_ELEMENTS = re.compile(r"""
    \\(?P<escaped>[()\[\]\\])
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|.)
""", re.VERBOSE | re.DOTALL)
# \b: "BREAKfast" or "A_BREAK" is a word of its own, not a break. The white space around a break
# goes with it (it separates nothing: the break does).
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt(text: str) -> list[tuple[str, float | None]]:
    """``text`` as (fragment, weight) pairs in order, adjacent fragments of equal weight merged;
    a BREAK is the pair ``BREAK``. An empty prompt is ``[("", 1.0)]``."""
    fragments: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    open_round: list[int] = []  # the index in ``fragments`` where each open bracket started
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[1] is not None:
                fragment[1] *= factor

    def add(piece: str) -> None:
        for i, part in enumerate(_BREAK.split(piece)):
            if i:
                fragments.append(list(BREAK))
            fragments.append([part, 1.0])

    for m in _ELEMENTS.finditer(text):
        if m["escaped"]:
            add(m["escaped"])
        elif m["open"]:
            (open_round if m["open"] == "(" else open_square).append(len(fragments))
        elif m["weight"] is not None and open_round:
            scale(open_round.pop(), float(m["weight"]))
        elif m["close"] == ")" and open_round:
            scale(open_round.pop(), EMPHASIS)
        elif m["close"] == "]" and open_square:
            scale(open_square.pop(), 1 / EMPHASIS)
        else:  # plain text, or a bracket / ":number)" that closes nothing: literal
            add(m[0])
    for start in open_round:
        scale(start, EMPHASIS)
    for start in open_square:
        scale(start, 1 / EMPHASIS)

    merged: list[tuple[str, float | None]] = []
    for piece, weight in fragments:
        if weight is not None and not piece:
            continue
        if merged and weight is not None and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def chunk_tokens(pieces: Sequence[tuple[Sequence[int], float] | None], comma_id: int, size: int = 75,
                 backtrack: int = COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
    """Token ids of weighted pieces (None: a BREAK) -> chunks of at most ``size`` (ids, weights).

    A chunk closes when it is full and another token comes, or at a BREAK. If its last comma is
    among its last ``backtrack`` tokens, the tokens after that comma move to the next chunk (unless
    the token that came is itself a comma: the chunk then closes as it is). There is always one
    chunk; a BREAK at the start, or two in a row, give an empty one."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    comma = -1  # the index of the current chunk's last comma

    for piece in pieces:
        if piece is None:
            chunks.append((ids, weights))
            ids, weights, comma = [], [], -1
            continue
        piece_ids, weight = piece
        for token in piece_ids:
            if len(ids) == size:
                keep = comma + 1 if token != comma_id and comma >= size - backtrack else size
                chunks.append((ids[:keep], weights[:keep]))
                ids, weights, comma = ids[keep:], weights[keep:], -1  # no comma after the last one
            if token == comma_id:
                comma = len(ids)
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


@dataclass
class PromptTokens:
    """One text for one tokenizer: (chunks, max_length) ids and their weights (1 on the start,
    end and pad tokens)."""

    ids: np.ndarray
    weights: np.ndarray


def check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens != CLIP_TOKENS):
        raise InputError(f"max_tokens must be None (long prompts encoded in chunks) or {CLIP_TOKENS} (cut there, "
                         f"as diffusers does), not {max_tokens!r}.")


def tokenize_prompt(tokenizer, text: str, weighting: bool = True, max_tokens: int | None = None) -> PromptTokens:
    """``text``'s chunks for ``tokenizer`` (our CLIPTokenizer). ``weighting=False`` reads the text
    as written (no brackets, escapes or BREAK). ``max_tokens=77`` keeps the first chunk, filled to
    its 75 tokens whatever the commas, and warns of the rest, as the tokenizer does for one prompt."""
    length = tokenizer.max_length
    if weighting:
        # Each fragment is tokenized alone: a bracket ends a word, as white space does.
        pieces = [None if (piece, weight) == BREAK else (tokenizer.encode(piece), weight)
                  for piece, weight in parse_prompt(text)]
    else:
        pieces = [(tokenizer.encode(text), 1.0)]
    comma_id = tokenizer.encode(",")[0]
    chunks = chunk_tokens(pieces, comma_id, length - 2, COMMA_BACKTRACK if max_tokens is None else 0)
    if max_tokens is not None and len(chunks) > 1:
        dropped = [token for ids, _ in chunks[1:] for token in ids]
        # The tokenizer's own words, so that one warning reads the same with or without weights.
        warnings.warn(f"CLIP reads at most {length} tokens, so this prompt loses its last {len(dropped)}: "
                      f"{tokenizer.decode(dropped)!r}", stacklevel=3)
        chunks = chunks[:1]
    ids = np.full((len(chunks), length), tokenizer.pad_token_id, dtype=np.int32)
    weights = np.ones((len(chunks), length), dtype=np.float32)
    for row, (chunk, chunk_weights) in enumerate(chunks):
        ids[row, : len(chunk) + 2] = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        weights[row, 1: len(chunk) + 1] = chunk_weights
    return PromptTokens(ids, weights)


def batch_tokens(prompts: Sequence[PromptTokens], chunks: int, tokenizer) -> PromptTokens:
    """Prompts of one tokenizer padded with empty chunks (start, end, pad tokens: the empty
    prompt) to ``chunks`` each: (batch, chunks, max_length) ids and weights."""
    empty = tokenize_prompt(tokenizer, "", weighting=False)
    ids = np.stack([np.concatenate([p.ids, *[empty.ids] * (chunks - len(p.ids))]) for p in prompts])
    weights = np.stack([np.concatenate([p.weights, *[empty.weights] * (chunks - len(p.ids))]) for p in prompts])
    return PromptTokens(ids, weights)


def apply_weights(states: mx.array, weights: np.ndarray) -> mx.array:
    """Chunks' states (N, tokens, width) with each token's states multiplied by its weight
    (N, tokens), then each chunk scaled back to its unweighted mean, as A1111 does.

    A1111 takes the mean over its whole batch, which makes a prompt's embedding depend on the
    prompts beside it; here it is each chunk's own (77, width) states, so a prompt is encoded
    alike alone or in any batch. Chunks without weights are returned bit for bit unchanged."""
    plain = np.all(weights == 1, axis=-1)
    if plain.all():
        return states
    z = states.astype(mx.float32)  # means over 77 x 2048 values: not in half precision
    original = z.mean(axis=(1, 2), keepdims=True)
    z = z * mx.array(weights)[..., None]
    z = z * (original / z.mean(axis=(1, 2), keepdims=True))
    return mx.where(mx.array(plain)[:, None, None], states, z.astype(states.dtype))


def encode_chunks(encoder, tokens: PromptTokens, hidden_layer: int, final_norm=None) -> tuple[mx.array, mx.array]:
    """One text encoder on (batch, chunks, length) tokens: (the weighted states of
    ``hidden_layer``, final-normed by ``final_norm`` where given, concatenated over the chunks:
    (batch, chunks * length, width); the unweighted pooled output of each first chunk)."""
    batch, chunks, length = tokens.ids.shape
    hidden, pooled = encoder(mx.array(tokens.ids.reshape(batch * chunks, length)), hidden_layer=hidden_layer)
    if final_norm is not None:
        hidden = final_norm(hidden)
    hidden = apply_weights(hidden, tokens.weights.reshape(batch * chunks, length))
    if chunks == 1:
        return hidden, pooled
    return hidden.reshape(batch, chunks * length, -1), pooled.reshape(batch, chunks, -1)[:, 0]


def unique(items: Sequence) -> tuple[list, list[int]]:
    """(the distinct items in order of first appearance, each item's index among them)."""
    first: dict = {}
    index = [first.setdefault(item, len(first)) for item in items]
    return list(first), index


def gather(array: mx.array | None, index: list[int]) -> mx.array | None:
    """Rows of ``array`` by ``index``: the encoded distinct prompts back in the batch's order."""
    if array is None or index == list(range(array.shape[0])):
        return array
    return array[mx.array(index)]


# ---------------------------------------------------------------------- a pipeline's prompts


@dataclass
class PromptEmbeddings:
    """What the UNet is conditioned on: (B, 77 * chunks, width) token states (a long prompt is
    encoded in chunks of 77; the negative prompt has as many), (B, pooled) for SDXL (None for
    SD 1.x / 2.x), and the negative pair (None: zeros, SDXL's ``force_zeros_for_empty_prompt``)."""

    context: mx.array
    pooled: mx.array | None
    negative_context: mx.array | None
    negative_pooled: mx.array | None

    def repeated(self, n: int) -> "PromptEmbeddings":
        """Each prompt's embeddings ``n`` times, next to each other (diffusers' order of images)."""
        if n == 1:
            return self
        rep = (lambda a: None if a is None else mx.repeat(a, n, axis=0))
        return PromptEmbeddings(rep(self.context), rep(self.pooled), rep(self.negative_context),
                                rep(self.negative_pooled))


def per_prompt(value: str | Sequence[str], name: str, count: int) -> list[str]:
    """``value`` for each of ``count`` prompts: one string (or a list of one) serves them all."""
    values = check_prompts(value, name)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise PipelineError(f"{name} has {len(values)} entries for {count} prompts; give one, or one per prompt.")
    return values


def encode_sides(sides: Sequence[tuple[list[str], list[str], int | None]], tokenizers: Sequence, encode,
                 weighting: bool, max_tokens: int | None) -> list[mx.array | None]:
    """Each side's (prompts, prompts_2, clip_skip), the prompt's and the negative prompt's, through
    ``encode`` (a pipeline's ``_encode``: each encoder's tokens, or None where it has none ->
    (states, pooled)): [states, pooled] per side. Each side's distinct (prompt, prompt_2) pairs are
    tokenized for each encoder and encoded once; then every one is padded with empty chunks to the
    longest, so that prompt and negative prompt, and the two encoders' states, line up token for
    token."""
    tokenized = []
    for texts, texts_2, _ in sides:
        pairs, index = unique(list(zip(texts, texts_2)))
        per_encoder = [None if tokenizer is None else
                       [tokenize_prompt(tokenizer, pair[i], weighting, max_tokens) for pair in pairs]
                       for i, tokenizer in enumerate(tokenizers)]
        tokenized.append((index, per_encoder))
    chunks = max(len(t.ids) for _, per_encoder in tokenized for texts in per_encoder if texts for t in texts)
    encoded = []
    for (_, _, skip), (index, per_encoder) in zip(sides, tokenized):
        tokens = [None if texts is None else batch_tokens(texts, chunks, tokenizer)
                  for texts, tokenizer in zip(per_encoder, tokenizers)]
        encoded += [gather(a, index) for a in encode(tokens, skip)]
    return encoded
