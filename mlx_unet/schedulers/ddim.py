"""DDIM sampler, deterministic (eta = 0) (diffusers' ``DDIMScheduler``).

Works on the VP sample directly: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, with a the
cumulative alpha product at the current and previous timestep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..configs.base import check_number
from ..errors import InputError
from .base import (
    BetaScheduleConfig,
    Scheduler,
    StepOutput,
    check_steps,
    spaced_timesteps,
    table_index,
    vp_add_noise,
)


@dataclass(frozen=True)
class DDIMConfig(BetaScheduleConfig):
    """diffusers' ``DDIMScheduler`` fields and defaults (note: "leading" spacing, clipping on).

    Implemented: clip_sample with clip_sample_range, set_alpha_to_one, steps_offset, the three
    spacings, epsilon / v_prediction. ``dynamic_thresholding_ratio`` and ``sample_max_value``
    act only with ``thresholding``, which is refused, so they take any value.
    """

    timestep_spacing: str = "leading"
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0

    def _validate(self) -> None:
        super()._validate()
        self._flag("clip_sample")
        self._flag("set_alpha_to_one")
        self._flag("thresholding", (False,))
        check_number("clip_sample_range", self.clip_sample_range)


class DDIMScheduler(Scheduler):
    """DDIM with eta = 0 in MLX.

    DDIM keeps no step index: each ``step`` reads its timestep and steps back by
    ``num_train_timesteps // num_inference_steps``, exactly as diffusers does, even for
    "trailing" and "linspace" spacings where that is not the next scheduled timestep.
    ``set_begin_index`` is accepted for a uniform interface and changes nothing. There is no
    ``sigmas``; ``timesteps`` are integers (int32 here, int64 in diffusers).
    """

    config_class = DDIMConfig
    init_noise_sigma = 1.0

    def __init__(self, config: DDIMConfig | None = None):
        super().__init__(config)
        # The "previous" cumulative alpha of the last step: 1 (fully denoised) or the table's first.
        acp = self.alphas_cumprod_np
        self._final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else acp[0]
        self._timesteps_np = np.arange(self.config.num_train_timesteps)[::-1].copy()
        self.timesteps = mx.array(self._timesteps_np.astype(np.int32))

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps)
        c = self.config
        if num_inference_steps > c.num_train_timesteps:
            raise InputError(
                f"num_inference_steps = {num_inference_steps} exceeds num_train_timesteps = {c.num_train_timesteps}."
            )
        timesteps = spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset)
        self._timesteps_np = timesteps.round().astype(np.int64)
        self.timesteps = mx.array(self._timesteps_np.astype(np.int32))
        self.num_inference_steps = num_inference_steps
        self._reset_index()

    def scale_model_input(self, sample: mx.array, timestep: Any = None) -> mx.array:
        """Identity: DDIM works on unscaled samples."""
        return sample

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        """One DDIM step with eta = 0; ``noise`` is unused (the step is deterministic)."""
        if self.num_inference_steps is None:
            raise InputError("DDIMScheduler: call set_timesteps(num_inference_steps) first.")
        # Negative values index from the end, as torch indexing does in diffusers (a "trailing"
        # schedule can end at -1).
        t = table_index(timestep, self.config.num_train_timesteps, negative=True)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        acp = self.alphas_cumprod_np
        a_t = acp[t]
        a_prev = acp[prev_t] if prev_t >= 0 else self._final_alpha_cumprod
        # float32 scalars, as diffusers' 0-d tensor arithmetic.
        sqrt_a, sqrt_b = float(np.sqrt(a_t)), float(np.sqrt(np.float32(1.0) - a_t))
        out_dtype = model_output.dtype
        sample = sample.astype(mx.float32)
        model_output = model_output.astype(mx.float32)
        if self.config.prediction_type == "epsilon":
            x0 = (sample - sqrt_b * model_output) / sqrt_a
            eps = model_output
        else:  # v_prediction
            x0 = sqrt_a * sample - sqrt_b * model_output
            eps = sqrt_a * model_output + sqrt_b * sample
        if self.config.clip_sample:
            r = float(self.config.clip_sample_range)
            x0 = mx.clip(x0, -r, r)
        direction = float(np.sqrt(np.float32(1.0) - a_prev)) * eps
        prev = float(np.sqrt(a_prev)) * x0 + direction
        return StepOutput(prev.astype(out_dtype), x0)

    def add_noise(self, original_samples: mx.array, noise: mx.array, timesteps: Any) -> mx.array:
        """sqrt(a_t) x + sqrt(1 - a_t) noise, indexed by the timesteps themselves."""
        return vp_add_noise(self.alphas_cumprod_np, original_samples, noise, timesteps, negative=True)
