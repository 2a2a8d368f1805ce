"""Latent Consistency Model sampler (diffusers' ``LCMScheduler``, for LCM / LCM-LoRA distillations).

A consistency model maps any point of a trajectory straight to its end: each step predicts x0,
applies the consistency boundary condition (denoised = c_skip x + c_out x0, which is x itself at
t = 0), then re-noises that estimate to the next timestep with fresh noise (none after the last).
The timesteps are a subset of the distillation schedule (``original_inference_steps`` evenly
spaced training timesteps), not a re-spacing of the training range.

This module also holds what TCD (``tcd.py``) shares with LCM, the schedule of the consistency
distillations, and what PNDM shares with both: integer timestep lookup and the VP ``add_noise``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..configs.base import check_int, check_number
from ..errors import ConfigError, InputError
from .base import (
    BetaScheduleConfig,
    Scheduler,
    StepOutput,
    check_steps,
    step_noise,
    table_index,
    vp_add_noise,
)

# diffusers' fixed sigma_data of the boundary condition (get_scalings_for_boundary_condition_discrete).
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class ConsistencyConfig(BetaScheduleConfig):
    """The fields diffusers' ``LCMScheduler`` and ``TCDScheduler`` share, with their defaults.

    Neither class reads ``timestep_spacing`` or ``steps_offset`` (the schedule comes from
    ``original_inference_steps`` alone), and ``set_alpha_to_one`` only acts on a negative
    previous timestep, which no schedule here holds (negative custom timesteps are refused):
    those take any valid value.
    """

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    timestep_scaling: float = 10.0

    def _validate(self) -> None:
        super()._validate()
        check_int("original_inference_steps", self.original_inference_steps)
        if self.original_inference_steps > self.num_train_timesteps:
            raise ConfigError(
                f"config field 'original_inference_steps' = {self.original_inference_steps} exceeds "
                f"num_train_timesteps = {self.num_train_timesteps}."
            )
        self._flag("set_alpha_to_one")


@dataclass(frozen=True)
class LCMConfig(ConsistencyConfig):
    """diffusers' ``LCMScheduler`` fields and defaults.

    Implemented: epsilon / v_prediction, clip_sample with clip_sample_range, timestep_scaling.
    Refused: thresholding (dynamic thresholding is for pixel-space models), hence
    ``dynamic_thresholding_ratio`` and ``sample_max_value`` take any value.
    """

    def _validate(self) -> None:
        super()._validate()
        self._flag("clip_sample")
        self._flag("thresholding", (False,))
        check_number("clip_sample_range", self.clip_sample_range)
        check_number("timestep_scaling", self.timestep_scaling)


def consistency_timesteps(config: ConsistencyConfig, steps: int, strength: float) -> np.ndarray:
    """``steps`` descending timesteps of the distillation schedule, as LCM / TCD pick them.

    The distillation schedule is k - 1, 2k - 1, ..., with k = num_train // original_inference_steps
    (999 last for 50 of 1000); ``strength`` < 1 keeps only its lowest int(original * strength)
    entries (img2img). Of those, counted from the top, the entries at floor(linspace(0, len,
    steps, endpoint=False)) are taken: evenly spaced in index, not in timestep.
    """
    original = config.original_inference_steps
    k = config.num_train_timesteps // original
    available = int(original * strength)
    if available < steps:
        raise InputError(
            f"{steps} steps need at least {steps} of the {original} distillation timesteps "
            f"(original_inference_steps), and strength {strength:g} leaves {available}."
        )
    origin = (np.arange(1, available + 1, dtype=np.int64) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, available, num=steps, endpoint=False)).astype(np.int64)
    return origin[picks]


class ConsistencyScheduler(Scheduler):
    """What LCM and TCD share: their schedule (with custom timesteps and ``strength``), the
    identity input scaling, and ``add_noise`` by timestep.

    ``timesteps`` are integers (int32 here, int64 in diffusers); there are no ``sigmas``.
    """

    config_class = ConsistencyConfig
    init_noise_sigma = 1.0
    takes_timesteps = True

    def __init__(self, config: ConsistencyConfig | None = None):
        super().__init__(config)
        # Before set_timesteps, as diffusers: the whole training range, descending.
        self._timesteps_np = np.arange(self.config.num_train_timesteps, dtype=np.int64)[::-1].copy()
        self.timesteps = mx.array(self._timesteps_np.astype(np.int32))

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: Any = None, *,
                      strength: float = 1.0) -> None:
        """The run's timesteps: ``num_inference_steps`` of the distillation schedule, or custom
        ``timesteps`` (descending integers; then num_inference_steps must be None).

        ``strength`` < 1 is diffusers' ``set_timesteps(strength=...)``, what its LCM img2img
        pipeline calls: the steps are then taken from the lower part of the distillation schedule
        (all ``num_inference_steps`` are run, from the first timestep); with custom timesteps the
        first ones are dropped instead.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise InputError("pass exactly one of num_inference_steps and timesteps.")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise InputError(f"strength must be in (0, 1], got {strength!r}.")
        if timesteps is None:
            check_steps(num_inference_steps)
            schedule = consistency_timesteps(self.config, num_inference_steps, strength)
        else:
            schedule = self._custom(timesteps)
            # As diffusers: num_inference_steps stays the whole list's length even when strength
            # drops its head, so the last step then is not recognised as the last (it adds noise).
            num_inference_steps = len(schedule)
            schedule = schedule[len(schedule) - min(int(len(schedule) * strength), len(schedule)):]
            if len(schedule) == 0:
                raise InputError(f"strength {strength:g} leaves none of the {num_inference_steps} timesteps.")
        self.num_inference_steps = num_inference_steps
        self._timesteps_np = schedule
        self.timesteps = mx.array(schedule.astype(np.int32))
        self._reset_index()

    def _custom(self, timesteps: Any) -> np.ndarray:
        values = np.asarray(np.array(timesteps) if isinstance(timesteps, mx.array) else timesteps).reshape(-1)
        n = self.config.num_train_timesteps
        if len(values) == 0 or not np.all(values == np.round(values)):
            raise InputError(f"custom timesteps must be a non-empty list of integers, got {timesteps!r}.")
        values = values.astype(np.int64)
        if np.any(np.diff(values) >= 0):
            raise InputError("custom timesteps must be in descending order.")
        if values[0] >= n or values[-1] < 0:
            raise InputError(f"custom timesteps must lie in 0..{n - 1}.")
        return values

    def scale_model_input(self, sample: mx.array, timestep: Any = None) -> mx.array:
        """Identity: these samplers work on unscaled samples."""
        return sample

    def _begin_step(self, timestep: Any) -> tuple[int, int, bool, int | None]:
        """(step index, timestep, whether it is the last step, the next scheduled timestep or None)."""
        i = self._current_index(timestep)
        t = table_index(timestep, self.config.num_train_timesteps)
        following = int(self._timesteps_np[i + 1]) if i + 1 < len(self._timesteps_np) else None
        return i, t, i == self.num_inference_steps - 1, following

    def _x0_and_eps(self, model_output: mx.array, sample: mx.array, a_t: np.float32):
        """The model's x0 and noise estimates at cumulative alpha ``a_t`` (float32 scalars)."""
        sqrt_a, sqrt_b = float(np.sqrt(a_t)), float(np.sqrt(np.float32(1.0) - a_t))
        if self.config.prediction_type == "epsilon":
            return (sample - sqrt_b * model_output) / sqrt_a, model_output
        # v_prediction
        return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample

    def add_noise(self, original_samples: mx.array, noise: mx.array, timesteps: Any) -> mx.array:
        """sqrt(a_t) x + sqrt(1 - a_t) noise, indexed by the timesteps themselves (img2img)."""
        return vp_add_noise(self.alphas_cumprod_np, original_samples, noise, timesteps)


class LCMScheduler(ConsistencyScheduler):
    """LCM multistep sampling in MLX, step for step diffusers' ``LCMScheduler``.

    ``step`` returns the consistency model's denoised estimate as ``pred_original_sample`` (what
    diffusers calls ``denoised``; its LCM pipelines output it). Every step but the last adds
    noise: ``step(..., noise=n)`` uses ``n`` (standard normal, the sample's shape), else
    ``mx.random`` draws it.
    """

    config_class = LCMConfig
    stochastic = True

    def _boundary_scalings(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) at timestep t: float32, as diffusers computes them from a timestep tensor."""
        scaled = np.float32(t) * np.float32(self.config.timestep_scaling)
        denominator = scaled * scaled + np.float32(SIGMA_DATA**2)
        return float(np.float32(SIGMA_DATA**2) / denominator), float(scaled / np.sqrt(denominator))

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        i, t, last, following = self._begin_step(timestep)
        out_dtype = model_output.dtype
        sample = sample.astype(mx.float32)
        x0, _ = self._x0_and_eps(model_output.astype(mx.float32), sample, self.alphas_cumprod_np[t])
        if self.config.clip_sample:
            x0 = mx.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        c_skip, c_out = self._boundary_scalings(t)
        denoised = c_out * x0 + c_skip * sample
        if last:
            prev = denoised
        else:
            # diffusers re-noises to the timestep itself when none follows (custom timesteps cut by
            # strength, whose last step is not counted as last).
            a_prev = self.alphas_cumprod_np[t if following is None else following]
            prev = float(np.sqrt(a_prev)) * denoised + float(np.sqrt(np.float32(1.0) - a_prev)) * step_noise(
                noise, model_output
            )
        self._step_index = i + 1
        return StepOutput(prev.astype(out_dtype), denoised)
