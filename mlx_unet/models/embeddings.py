"""Timestep sinusoids and the MLPs that turn them into the UNet's conditioning vector."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def sinusoid_frequencies(dim: int, freq_shift: float, max_period: float = 10000.0) -> np.ndarray:
    """The ``dim // 2`` frequencies of diffusers' ``get_timestep_embedding``.

    Computed once, in float32 and in diffusers' order of operations (scale the arange, then
    divide, then exp), so they agree with torch to the last bit or so: a timestep near 1000 turns a
    relative frequency error into an absolute phase error a thousand times larger.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    return np.exp(exponent).astype(np.float32)


class Timesteps(nn.Module):
    """(N,) timesteps -> (N, dim) float32 sinusoids; no parameters."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        # Underscored: a constant, not a parameter, so it stays out of the weights.
        self._frequencies = mx.array(sinusoid_frequencies(dim, freq_shift))

    def __call__(self, timesteps: mx.array) -> mx.array:
        angles = timesteps.astype(mx.float32)[:, None] * self._frequencies[None, :]
        sin, cos = mx.sin(angles), mx.cos(angles)
        emb = mx.concatenate([cos, sin] if self.flip_sin_to_cos else [sin, cos], axis=-1)
        if self.dim % 2:
            emb = mx.pad(emb, [(0, 0), (0, 1)])
        return emb


def guidance_scale_embedding(guidance_scale: float, dim: int, batch: int) -> mx.array:
    """(batch, dim) float32 sinusoids of ``guidance_scale - 1``: what a Latent Consistency
    distillation takes as ``timestep_cond`` (diffusers' ``get_guidance_scale_embedding``, in
    float32 and its order of operations: the angle is w * 1000 times 10000 ** (-i / (half - 1))).

    The angles reach thousands of radians, so an ulp of a frequency moves a phase by ~1e-4:
    exp, sin and cos are taken in float64 and rounded, which agrees with torch's float32
    functions far more often than numpy's float32 ones do."""
    half = dim // 2
    rate = np.float32(np.log(10000.0)) / np.float32(half - 1)
    frequencies = np.exp((np.arange(half, dtype=np.float32) * -rate).astype(np.float64)).astype(np.float32)
    angles = ((np.float32(guidance_scale - 1) * np.float32(1000.0)) * frequencies).astype(np.float64)
    emb = np.concatenate([np.sin(angles), np.cos(angles), np.zeros(dim % 2)]).astype(np.float32)
    return mx.broadcast_to(mx.array(emb)[None], (batch, dim))


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' names, so checkpoints load by key). With
    ``cond_dim``, a condition projected by ``cond_proj`` is added to the input first (LCM's
    guidance-scale embedding)."""

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)

    def __call__(self, x: mx.array, condition: mx.array | None = None) -> mx.array:
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(nn.silu(self.linear_1(x)))
