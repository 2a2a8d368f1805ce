"""Heun sampler (diffusers' ``HeunDiscreteScheduler``): Karras et al.'s second-order ODE solver.

Each step from sigma_i to sigma_{i+1} evaluates the model twice: an Euler step to sigma_{i+1}
(first order), then, at that point, a second derivative; the step is redone from the same start
with the mean of the two derivatives (trapezoidal rule). diffusers makes each evaluation one
entry of ``timesteps``, so a run of n steps has 2n - 1 of them (the last step, down to sigma 0,
where the model cannot be evaluated, stays a plain Euler step): timesteps t0, t1, t1, t2, t2, ...
and sigmas s0, s1, s1, s2, s2, ..., 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..configs.base import check_number
from .base import BetaScheduleConfig, StepOutput
from .euler import SigmaScheduler, check_respacing, custom_timesteps, euler_sigmas, interpolated_sigmas


@dataclass(frozen=True)
class HeunDiscreteConfig(BetaScheduleConfig):
    """diffusers' ``HeunDiscreteScheduler`` fields, defaults included (its betas default to SD's).

    Implemented: linear / scaled_linear / trained betas, epsilon and v_prediction, the three
    timestep spacings, steps_offset, Karras, exponential or beta sigmas, clip_sample.

    ``sigma_min`` / ``sigma_max`` are not parameters of diffusers' class, but its ``from_config``
    keeps any key it is given in ``config``, and the re-spacings read ``config.sigma_min`` /
    ``config.sigma_max`` when present: a config carrying them (an Euler one can) sets the ends.
    ``rescale_betas_zero_snr`` is no parameter either, and nothing reads it: any value is taken
    and stands for False.
    """

    beta_start: float = 0.00085
    beta_end: float = 0.012
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    sigma_min: float | None = None
    sigma_max: float | None = None

    def _validate(self) -> None:
        self._flag("rescale_betas_zero_snr")
        object.__setattr__(self, "rescale_betas_zero_snr", False)
        super()._validate()
        check_respacing(self)
        self._flag("clip_sample")
        check_number("clip_sample_range", self.clip_sample_range)


def interleaved(values: np.ndarray) -> np.ndarray:
    """v0, v1, v1, v2, v2, ...: every entry after the first twice (both evaluations of a step)."""
    return np.concatenate([values[:1], np.repeat(values[1:], 2)])


class HeunDiscreteScheduler(SigmaScheduler):
    """Heun sampler in MLX, step for step diffusers' ``HeunDiscreteScheduler``.

    A pipeline loop calls ``scale_model_input`` and ``step`` once per entry of ``timesteps``
    (2n - 1 for n steps); ``order`` is 2, so img2img starts at an even index (a step's first
    evaluation). ``timesteps`` are float32; ``sigmas`` ends with 0. ``step`` keeps the first
    evaluation's derivative: call ``set_timesteps`` before each new run.
    """

    config_class = HeunDiscreteConfig
    order = 2
    takes_timesteps = True

    def __init__(self, config: HeunDiscreteConfig | None = None):
        super().__init__(config)
        # As diffusers: until set_timesteps, the schedule of num_train_timesteps steps.
        self.set_timesteps(self.config.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: Any = None) -> None:
        """The schedule of ``num_inference_steps`` steps, or of the given ``timesteps``."""
        custom = custom_timesteps(self.config, num_inference_steps, timesteps)
        if custom is None:
            spaced, sigmas = euler_sigmas(self.config, self._table, num_inference_steps)
        else:
            spaced, sigmas = custom, interpolated_sigmas(self._table, custom)
        # Rounded to float32 before interleaving, as diffusers; the final 0 once (no evaluation there).
        sigmas = np.concatenate([interleaved(sigmas.astype(np.float32)), [0.0]]).astype(np.float32)
        self._set_tables(interleaved(spaced.astype(np.float32)), sigmas)
        self.num_inference_steps = len(custom) if custom is not None else num_inference_steps
        self._clear_state()

    def _clear_state(self) -> None:
        # The first evaluation's derivative, step size and start sample, while a step is half done.
        self._derivative: mx.array | None = None
        self._dt: float | None = None
        self._start: mx.array | None = None

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next ``step`` is a step's first evaluation."""
        return self._dt is None

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        """One evaluation's update; ``noise`` is unused (the sampler is deterministic).

        The first evaluation moves to the next sigma by Euler; the second replaces that move by
        one with the mean derivative from the same start. Which one it is follows the stored
        state, not the index, as in diffusers. Computed in float32; ``prev_sample`` comes back
        in the model output's dtype, ``pred_original_sample`` (this evaluation's x0) in float32.
        """
        i = self._current_index(timestep)
        sample = sample.astype(mx.float32)
        # Either way the model was evaluated at sigmas[i]: diffusers' sigma_hat in the first
        # evaluation, its sigma_next (the same entry, repeated) in the second.
        x0 = self._pred_original(model_output.astype(mx.float32), sample, i)
        if self.config.clip_sample:
            x0 = mx.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        derivative = (sample - x0) / float(self.sigmas_np[i])
        if self.state_in_first_order:
            self._derivative, self._start = derivative, sample
            self._dt = float(self.sigmas_np[i + 1] - self.sigmas_np[i])  # float32, as diffusers' dt
            prev = sample + derivative * self._dt
        else:
            prev = self._start + (self._derivative + derivative) / 2 * self._dt
            self._clear_state()
        self._step_index = i + 1
        return StepOutput(prev.astype(model_output.dtype), x0)
