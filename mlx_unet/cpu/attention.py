"""Attention on the CPU in cache-sized chunks, with the arithmetic-only base-2 softmax.

MLX's fused ``mx.fast.scaled_dot_product_attention`` is, on the CPU, the plain composition with
MLX's slow ``exp``. Instead:

- scores are computed in chunks of query rows of about 2 MB, in float32 (MLX has no fast
  half-precision matmul on the CPU), so the softmax passes over them run from cache; measured on
  SDXL's shapes (2 cores, 1 MB L2 each) about 2x faster than 4 MB chunks, and faster than 0.5 MB
  ones, where the matmuls get too small. A chunk has at least ``_MIN_ROWS`` query rows, though:
  over 16384 keys (the VAE's mid-block attention at 1024 px, SD 1.x's first level there) 2 MB
  is 32 rows, and each chunk's products then read all the keys and values for a few rows;
- a chunk's scores are computed transposed, keys by queries (k q^T), so the softmax's maximum is
  taken down columns and the passes that subtract it broadcast it along contiguous rows: MLX's
  CPU reduction over a row and its compiled kernels with a per-row broadcast run element by
  element, where the column forms vectorise (measured in README, "Scores transposed");
- log2(e) is folded into the queries, so the softmax is base 2 (``activations.softmax_weights``);
- a row of ones appended to v^T makes the second matmul return each query's weight sum too, and
  the output is divided by it: no pass over the weights to sum or normalise;
- the chunks of a large attention take turns on two CPU streams (``streams``): MLX runs a
  chunk's softmax passes on one thread, and there they take about as long as its two products,
  which BLAS runs on both cores. Each pipeline gets a stream and half of BLAS's threads, so one's
  softmax runs while the other's products do. The chunks' outputs are joined once, at the end,
  so that neither stream waits on the other before then. The attention is then evaluated where
  it is called.
"""

import mlx.core as mx
import mlx.nn as nn

from .activations import LOG2_E, softmax_weights
from .streams import evaluated_in_two_pipelines

# Scores per chunk: 2 MB in float32.
_CHUNK_SCORES = 1 << 19
# Query rows per chunk at least. Over 16384 keys, 128-row chunks (8 MB) took 0.83-0.85x the time
# of 32-row ones with one 512-wide head (the VAE's) and with 8 heads of 40 (SD 1.x), 0.97x with 4
# of 128; at 4096 keys 512-row chunks ran 1.2-1.4x slower than 128-row ones (the softmax passes
# then leave the caches).
_MIN_ROWS = 128
# ...within at most 8 MB of scores: a chunk's are working memory, and MLX runs several at once.
_MAX_CHUNK_SCORES = 1 << 21
# Scores (batch x heads x queries x keys) from which the chunks go through in two pipelines:
# four chunks' worth. Below, evaluating where called and handing BLAS's threads over cost more
# than the second pipeline saves: on SDXL's 512 px shapes in turns, two took 1.08-1.31x the time
# of one at 0.8-1.3 M scores, 0.69-0.84x at 2.6-3.2 M.
PIPELINES_FROM_SCORES = 4 * _CHUNK_SCORES


def chunk_rows(tokens: int, kv_tokens: int) -> int:
    """Query rows per chunk of scores (of one head)."""
    rows = _CHUNK_SCORES // kv_tokens
    if rows < _MIN_ROWS:
        rows = min(_MIN_ROWS, _MAX_CHUNK_SCORES // kv_tokens)
    return max(1, min(tokens, rows))


def in_two_pipelines(heads: int, tokens: int, kv_tokens: int) -> bool:
    """Whether an attention over ``heads`` (batch x heads) goes through two pipelines, where it
    can (not under ``mx.compile``, not without OpenBLAS)."""
    return heads * tokens * kv_tokens >= PIPELINES_FROM_SCORES


def _chunking(heads: int, tokens: int, kv_tokens: int) -> tuple[int, int]:
    """(query rows, heads) per chunk: whole heads in groups where a head's scores are less than
    a chunk's, in an even number of groups of nearly one size, so that the two pipelines get the
    same work (measured in README, "Attention in two pipelines")."""
    rows = chunk_rows(tokens, kv_tokens)
    if rows < tokens:
        return rows, 1
    groups = -(-heads // max(1, _CHUNK_SCORES // (tokens * kv_tokens)))
    groups += groups % 2 if groups > 1 else 0
    return rows, -(-heads // groups)


def chunked_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v for (batch, heads, tokens, head_dim) inputs, in q's dtype."""
    batch, heads, tokens, head_dim = q.shape
    kv_tokens, v_dim = k.shape[2], v.shape[3]
    dtype, f32 = q.dtype, mx.float32
    q_t = (q.astype(f32) * (scale * LOG2_E)).reshape(batch * heads, tokens, head_dim).swapaxes(1, 2)
    k = k.astype(f32).reshape(batch * heads, kv_tokens, head_dim)
    v = v.astype(f32).reshape(batch * heads, kv_tokens, v_dim)
    v_ones_t = mx.concatenate([v, mx.ones((batch * heads, kv_tokens, 1), f32)], axis=2).swapaxes(1, 2)

    def chunks(streams: tuple[mx.Stream, ...]) -> mx.array:
        rows, group = _chunking(batch * heads, tokens, kv_tokens)
        parts = []  # in the order of (head, query): one concatenation gives the whole output
        for h in range(0, batch * heads, group):
            for r in range(0, tokens, rows):
                with mx.stream(streams[len(parts) % len(streams)]):
                    scores_t = k[h:h + group] @ q_t[h:h + group, :, r:r + rows]
                    out = (v_ones_t[h:h + group] @ softmax_weights(scores_t, axis=-2)).swapaxes(1, 2)
                    parts.append((out[..., :v_dim] / out[..., v_dim:]).reshape(1, -1, v_dim))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)

    out = None
    if in_two_pipelines(batch * heads, tokens, kv_tokens):
        out = evaluated_in_two_pipelines(chunks, (q_t, k, v_ones_t))
    if out is None:
        out = chunks((mx.default_stream(mx.cpu),))
    return out.reshape(batch, heads, tokens, v_dim).astype(dtype)


class ChunkedAttention(nn.Module):
    """Takes the place of ``models.attention.ScaledDotProductAttention``."""

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        return chunked_attention(q, k, v, scale)
