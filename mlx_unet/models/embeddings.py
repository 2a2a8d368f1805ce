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


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' names, so checkpoints load by key)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))
