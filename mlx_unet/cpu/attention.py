"""Attention on the CPU in cache-sized chunks, with the arithmetic-only base-2 softmax.

MLX's fused ``mx.fast.scaled_dot_product_attention`` is, on the CPU, the plain composition with
MLX's slow ``exp``. Instead:

- scores are computed in chunks of query rows of about 2 MB, in float32 (MLX has no fast
  half-precision matmul on the CPU), so the softmax passes over them run from cache; measured on
  SDXL's shapes (2 cores, 1 MB L2 each) about 2x faster than 4 MB chunks, and faster than 0.5 MB
  ones, where the matmuls get too small. A chunk has at least ``_MIN_ROWS`` query rows, though:
  over 16384 keys (the VAE's mid-block attention at 1024 px, SD 1.x's first level there) 2 MB
  is 32 rows, and each chunk's products then read all the keys and values for a few rows;
- log2(e) is folded into the queries, so the softmax is base 2 (``activations.softmax_weights``);
- a column of ones appended to v makes the second matmul return each row's weight sum too, and
  the (tokens x head_dim) output is divided by it: no pass over the weights to sum or normalise;
- over many keys the chunks go through in two pipelines (``streams``): MLX runs a chunk's softmax
  passes on one thread, and there they take about as long as its two products, which BLAS runs
  on both cores. Each pipeline gets a stream and half of BLAS's threads, so one's softmax runs
  while the other's products do. The attention is then evaluated where it is called.
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
# Keys from which the chunks go through in two pipelines. Measured on 2 cores, the attention
# alone: 4096 keys, 20 heads of 64 (SDXL's 64x64 level, a guided 1024 px step) 0.63-0.76x the time
# of one pipeline; one head of 512 (the VAE's mid-block) 0.82x at 4096 and 16384 keys; 1024 keys
# and 20 heads of 64 (SDXL's 32x32 level) 1.15x, where each chunk's products are too short.
PIPELINES_FROM_KEYS = 4096


def chunk_rows(tokens: int, kv_tokens: int) -> int:
    """Query rows per chunk of scores (of one head)."""
    rows = _CHUNK_SCORES // kv_tokens
    if rows < _MIN_ROWS:
        rows = min(_MIN_ROWS, _MAX_CHUNK_SCORES // kv_tokens)
    return max(1, min(tokens, rows))


def chunked_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v for (batch, heads, tokens, head_dim) inputs, in q's dtype."""
    batch, heads, tokens, head_dim = q.shape
    kv_tokens, v_dim = k.shape[2], v.shape[3]
    dtype, f32 = q.dtype, mx.float32
    q = (q.astype(f32) * (scale * LOG2_E)).reshape(batch * heads, tokens, head_dim)
    k_t = k.astype(f32).reshape(batch * heads, kv_tokens, head_dim).swapaxes(1, 2)
    v = v.astype(f32).reshape(batch * heads, kv_tokens, v_dim)
    v_ones = mx.concatenate([v, mx.ones((batch * heads, kv_tokens, 1), f32)], axis=2)

    def chunks(streams: tuple[mx.Stream, ...]) -> mx.array:
        rows = chunk_rows(tokens, kv_tokens)
        group = max(1, _CHUNK_SCORES // (rows * kv_tokens)) if rows == tokens else 1
        per_head, turn = [], 0
        for h in range(0, batch * heads, group):
            parts = []
            for r in range(0, tokens, rows):
                with mx.stream(streams[turn % len(streams)]):
                    out = softmax_weights(q[h:h + group, r:r + rows] @ k_t[h:h + group]) @ v_ones[h:h + group]
                    parts.append(out[..., :v_dim] / out[..., v_dim:])
                turn += 1
            per_head.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1))
        return per_head[0] if len(per_head) == 1 else mx.concatenate(per_head, axis=0)

    out = evaluated_in_two_pipelines(chunks, (q, k_t, v_ones)) if kv_tokens >= PIPELINES_FROM_KEYS else None
    if out is None:
        out = chunks((mx.default_stream(mx.cpu),))
    return out.reshape(batch, heads, tokens, v_dim).astype(dtype)


class ChunkedAttention(nn.Module):
    """Takes the place of ``models.attention.ScaledDotProductAttention``."""

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        return chunked_attention(q, k, v, scale)
