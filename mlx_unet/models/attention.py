"""Transformer2DModel and its parts: Attention, GEGLU feed-forward, BasicTransformerBlock.

Tokens are a reshape of the NHWC activation, (B, H, W, C) -> (B, H*W, C): no transpose.
"""

import mlx.core as mx
import mlx.nn as nn

from .norm import GroupNorm


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T * scale) v for (batch, heads, tokens, head_dim) inputs: MLX's fused kernel.

    A module without parameters, so that a faster kernel for one device can take its place
    (``mlx_unet.cpu`` swaps in chunked CPU attention)."""

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


class GatedGELU(nn.Module):
    """value * GELU(gate), the exact (erf) GELU, torch's default; swappable like the attention."""

    def __call__(self, value: mx.array, gate: mx.array) -> mx.array:
        return value * nn.gelu(gate)


class Attention(nn.Module):
    """Multi-head attention with diffusers' names: to_q/to_k/to_v without bias, to_out.0 with."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = [nn.Linear(inner, query_dim)]  # index 0, as in diffusers' ModuleList
        self.attention = ScaledDotProductAttention()

    def _split_heads(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

    def keys_values(self, context: mx.array) -> tuple[mx.array, mx.array]:
        """The keys and values of ``context`` tokens, (B, heads, tokens, head_dim) each. For the
        cross-attention they depend on the text alone, so a sampling loop computes them once
        (``UNet2DConditionModel.cross_attention_kv``) rather than in every step."""
        return self._split_heads(self.to_k(context)), self._split_heads(self.to_v(context))

    def __call__(self, x: mx.array, keys_values: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """Attention of ``x`` to itself, or to the tokens whose ``keys_values`` are given."""
        q = self._split_heads(self.to_q(x))
        k, v = self.keys_values(x) if keys_values is None else keys_values
        dtype = q.dtype
        if self.upcast and dtype != mx.float32:
            # SD 2.x sets upcast_attention: its logits overflow float16.
            q, k, v = (t.astype(mx.float32) for t in (q, k, v))
        out = self.attention(q, k, v, self.scale).astype(dtype)
        b, _, n, _ = out.shape
        return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class GEGLU(nn.Module):
    """proj to 2x the inner width; the first half is the value, GELU of the second half the gate."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)
        self.activation = GatedGELU()

    def __call__(self, x: mx.array) -> mx.array:
        value, gate = mx.split(self.proj(x), 2, axis=-1)
        return self.activation(value, gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # diffusers' indices: net.0 is GEGLU, net.1 a Dropout (no parameters), net.2 the output.
        self.net = [GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, text_kv: tuple[mx.array, mx.array]) -> mx.array:
        """``text_kv``: ``attn2.keys_values`` of the text context."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), text_kv)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> BasicTransformerBlocks -> proj_out, plus the residual.

    proj_in/proj_out are Linear layers (SDXL, SD 2.x) or 1x1 convolutions (SD 1.x). On NHWC the
    two compute the same thing; the conv form is kept so SD 1.x weights load by key and shape.
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 linear_projection: bool, upcast: bool):
        super().__init__()
        head_dim = channels // heads
        # The norm eps is fixed at 1e-6 in diffusers, unlike the resnets' configurable norm_eps.
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = [
            BasicTransformerBlock(channels, heads, head_dim, context_dim, upcast) for _ in range(depth)
        ]

    def cross_attention_kv(self, context: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Each block's cross-attention keys and values of the text ``context``."""
        return [block.attn2.keys_values(context) for block in self.transformer_blocks]

    def __call__(self, x: mx.array, text_kv: list[tuple[mx.array, mx.array]]) -> mx.array:
        """``text_kv``: what :meth:`cross_attention_kv` made of the text context."""
        b, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block, block_kv in zip(self.transformer_blocks, text_kv, strict=True):
            tokens = block(tokens, block_kv)
        return x + self.proj_out(tokens.reshape(b, h, w, c))
