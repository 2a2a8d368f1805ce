"""Euler discrete sampler (diffusers' ``EulerDiscreteScheduler``, SDXL base's default).

Deterministic first-order ODE steps in sigma: x <- x + (x - x0) / sigma * (sigma_next - sigma).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..configs.base import check_choice, check_number
from ..errors import InputError
from .base import (
    BetaScheduleConfig,
    Scheduler,
    StepOutput,
    check_steps,
    per_item,
    sigma_table,
    sigma_to_t,
    spaced_timesteps,
)
from .sigmas import karras_sigmas


@dataclass(frozen=True)
class EulerDiscreteConfig(BetaScheduleConfig):
    """diffusers' ``EulerDiscreteScheduler`` fields, defaults included.

    Implemented: linear / scaled_linear / trained betas, epsilon and v_prediction, the three
    timestep spacings, steps_offset, Karras sigmas (with optional sigma_min / sigma_max ends),
    linear sigma interpolation and a final sigma of zero. Everything else is refused by name.
    """

    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    def _validate(self) -> None:
        super()._validate()
        check_choice("interpolation_type", self.interpolation_type, ("linear",))
        self._flag("use_karras_sigmas")
        self._flag("use_exponential_sigmas", (False,))
        self._flag("use_beta_sigmas", (False,))
        for name in ("sigma_min", "sigma_max"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name))
        # "continuous" timesteps are 0.25 log sigma (EDM-style v-prediction models), another UNet input.
        check_choice("timestep_type", self.timestep_type, ("discrete",))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero",))


def euler_sigmas(config: Any, table: np.ndarray, steps: int, karras: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas without the final zero), as float64, for Euler-type samplers."""
    timesteps = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, steps, config.steps_offset)
    # Interpolated at float32 timesteps: diffusers casts them before interpolating.
    sigmas = np.interp(timesteps.astype(np.float32), np.arange(len(table)), table)
    if karras:
        # The Karras ends are the *spaced* schedule's first and last sigmas (unless configured),
        # not the training table's: with "leading" spacing the last one is sigma(t=steps_offset).
        lo = config.sigma_min if config.sigma_min is not None else float(sigmas[-1])
        hi = config.sigma_max if config.sigma_max is not None else float(sigmas[0])
        sigmas = karras_sigmas(lo, hi, steps)
        timesteps = sigma_to_t(sigmas, np.log(table))
    return timesteps, sigmas


class EulerDiscreteScheduler(Scheduler):
    """Euler sampler in MLX, step for step diffusers' ``EulerDiscreteScheduler``.

    ``timesteps`` are float32 (fractional with "linspace" spacing or Karras sigmas); ``sigmas``
    has one more entry than ``timesteps``, the final 0.
    """

    config_class = EulerDiscreteConfig

    def __init__(self, config: EulerDiscreteConfig | None = None):
        super().__init__(config)
        self._table = sigma_table(self.alphas_cumprod_np)
        # Before set_timesteps, as diffusers: the whole training schedule.
        train = np.linspace(0, self.config.num_train_timesteps - 1, self.config.num_train_timesteps)[::-1]
        self._set_schedule(train.astype(np.float32), self._table[::-1])
        self.num_inference_steps = None

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the starting noise.

        As diffusers: the largest sigma, or sqrt(sigma^2 + 1) for "leading" spacing, whose first
        timestep (e.g. 951 of 1000) sits below the fully-noised end of the table.
        """
        top = self.sigmas_np.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(top)
        return float(np.sqrt(top * top + np.float32(1.0)))

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps)
        timesteps, sigmas = euler_sigmas(self.config, self._table, num_inference_steps, self.config.use_karras_sigmas)
        self._set_schedule(timesteps.astype(np.float32), sigmas)
        self.num_inference_steps = num_inference_steps

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        self._timesteps_np = timesteps
        self.timesteps = mx.array(timesteps)
        self.sigmas_np = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = mx.array(self.sigmas_np)
        s = self.sigmas_np[:-1]
        # Per-step float32 scalars, each computed as diffusers' 0-d float32 tensor arithmetic does.
        self._input_scale = np.sqrt(s * s + np.float32(1.0))  # divides the model input
        self._v_out = -s / self._input_scale  # v-prediction: x0 = v * v_out + x / v_div
        self._v_div = s * s + np.float32(1.0)
        self._reset_index()

    def scale_model_input(self, sample: mx.array, timestep: Any) -> mx.array:
        """The UNet sees x / sqrt(sigma^2 + 1): unit variance, as in training."""
        i = self._current_index(timestep)
        return sample / float(self._input_scale[i])

    def _check_timestep(self, timestep: Any) -> None:
        # diffusers refuses integer timesteps here: they usually are loop indices from enumerate().
        python_int = isinstance(timestep, int) and not isinstance(timestep, bool)
        if python_int or (isinstance(timestep, mx.array) and mx.issubdtype(timestep.dtype, mx.integer)):
            raise InputError(
                f"{type(self).__name__}.step() got an integer timestep {timestep!r}; pass a value of "
                "scheduler.timesteps (float), not a loop index."
            )

    def _pred_original(self, model_output: mx.array, sample: mx.array, i: int) -> mx.array:
        sigma = float(self.sigmas_np[i])
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * float(self._v_out[i]) + sample / float(self._v_div[i])

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        """One Euler step. ``noise`` is unused (the sampler is deterministic; s_churn is 0).

        Computed in float32 whatever the input dtype; ``prev_sample`` comes back in the model
        output's dtype, ``pred_original_sample`` in float32, as diffusers returns them.
        """
        prev, x0, i = self._euler_move(model_output, timestep, sample, lambda i: self.sigmas_np[i + 1])
        self._step_index = i + 1
        return StepOutput(prev.astype(model_output.dtype), x0)

    def _euler_move(self, model_output, timestep, sample, target_sigma):
        """The Euler move from sigma(t) to ``target_sigma(i)``, in float32: (x, x0, step index)."""
        self._check_timestep(timestep)
        i = self._current_index(timestep)
        sample = sample.astype(mx.float32)
        x0 = self._pred_original(model_output.astype(mx.float32), sample, i)
        derivative = (sample - x0) / float(self.sigmas_np[i])
        return sample + derivative * float(target_sigma(i) - self.sigmas_np[i]), x0, i

    def add_noise(self, original_samples: mx.array, noise: mx.array, timesteps: Any) -> mx.array:
        """x + sigma(t) * noise, one sigma per batch item (img2img's starting latent)."""
        sigma = per_item(self.sigmas_np[self._add_noise_indices(timesteps)], original_samples)
        return original_samples + noise * sigma
