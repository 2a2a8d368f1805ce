"""Euler ancestral sampler (diffusers' ``EulerAncestralDiscreteScheduler``, sdxl-turbo's).

Each step goes deterministically down to sigma_down, then adds fresh noise of size sigma_up,
with sigma_down^2 + sigma_up^2 = sigma_next^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import InputError
from .base import BetaScheduleConfig, StepOutput, check_steps
from .euler import EulerDiscreteScheduler, euler_sigmas


@dataclass(frozen=True)
class EulerAncestralDiscreteConfig(BetaScheduleConfig):
    """diffusers' ``EulerAncestralDiscreteScheduler`` fields (it has no sigma options of its own)."""


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler ancestral in MLX: diffusers' schedule, input scaling and step, with caller noise.

    ``step(..., noise=n)`` uses ``n`` (a standard normal array of the sample's shape) for the
    ancestral noise, so a run can be reproduced or compared; without it, ``mx.random`` draws it.
    """

    config_class = EulerAncestralDiscreteConfig
    stochastic = True
    takes_timesteps = False  # as its diffusers class, unlike Euler's

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps)
        timesteps, sigmas = euler_sigmas(self.config, self._table, num_inference_steps, karras=False)
        self._set_schedule(timesteps.astype(np.float32), sigmas)
        self.num_inference_steps = num_inference_steps

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        super()._set_schedule(timesteps, sigmas)
        s_from, s_to = self.sigmas_np[:-1], self.sigmas_np[1:]
        # float32, in diffusers' order of operations; the last step (to sigma 0) adds no noise.
        self._sigma_up = np.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
        self._sigma_down = np.sqrt(s_to * s_to - self._sigma_up * self._sigma_up)

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        prev, x0, i = self._euler_move(model_output, timestep, sample, lambda i: self._sigma_down[i])
        if noise is None:
            noise = mx.random.normal(model_output.shape)
        elif tuple(noise.shape) != tuple(model_output.shape):
            raise InputError(f"noise has shape {tuple(noise.shape)}, the model output {tuple(model_output.shape)}.")
        prev = prev + noise.astype(mx.float32) * float(self._sigma_up[i])
        self._step_index = i + 1
        return StepOutput(prev.astype(model_output.dtype), x0)
