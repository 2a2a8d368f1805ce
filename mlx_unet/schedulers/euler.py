"""Euler discrete sampler (diffusers' ``EulerDiscreteScheduler``, SDXL base's default), and what
the samplers on Euler's sigma parametrisation share (Euler ancestral, Heun, LMS).

Those samplers see the noisy sample as x = x0 + sigma * eps with the training sigmas
sqrt((1 - a) / a), walk a descending list of sigmas down to 0, feed the UNet
x / sqrt(sigma^2 + 1) (unit variance, as in training), and space their timesteps alike.
Euler itself takes deterministic first-order ODE steps in sigma:
x <- x + (x - x0) / sigma * (sigma_next - sigma).
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
from .sigmas import SIGMA_FLAGS, chosen_respacing, respaced


@dataclass(frozen=True)
class EulerDiscreteConfig(BetaScheduleConfig):
    """diffusers' ``EulerDiscreteScheduler`` fields, defaults included.

    Implemented: linear / scaled_linear / trained betas, epsilon and v_prediction, the three
    timestep spacings, steps_offset, Karras, exponential or beta sigmas (with optional
    sigma_min / sigma_max ends), linear sigma interpolation and a final sigma of zero.
    Everything else is refused by name.
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
        check_respacing(self)
        # "continuous" timesteps are 0.25 log sigma (EDM-style v-prediction models), another UNet input.
        check_choice("timestep_type", self.timestep_type, ("discrete",))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero",))


def check_respacing(config: Any) -> None:
    """The three re-spacing flags (one at most) and the optional sigma_min / sigma_max ends."""
    for flag in SIGMA_FLAGS.values():
        config._flag(flag)
    chosen_respacing(config)
    for name in ("sigma_min", "sigma_max"):
        if getattr(config, name) is not None:
            # Positive: the spacings take their log or 7th root, and every step divides by sigma.
            check_number(name, getattr(config, name), positive=True)


def interpolated_sigmas(table: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """The training sigmas at (fractional) ``timesteps``, float64, linearly interpolated.

    At the float32 timesteps: diffusers casts them before interpolating.
    """
    return np.interp(timesteps.astype(np.float32), np.arange(len(table)), table)


def respace_sigmas(
    kind: str, sigmas: np.ndarray, table: np.ndarray, steps: int, sigma_min: float | None, sigma_max: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas), float64: ``steps`` sigmas re-spaced by ``kind``, and their fractional
    training timesteps.

    ``steps``, not ``len(sigmas)``: 61 "trailing" steps space 62 timesteps, and diffusers then
    re-spaces 61 sigmas between their ends. The ends are ``sigma_min`` / ``sigma_max`` where
    given, else the spaced schedule's last and first sigmas, not the training table's: with
    "leading" spacing the last one is sigma(t=steps_offset).
    """
    lo = sigma_min if sigma_min is not None else float(sigmas[-1])
    hi = sigma_max if sigma_max is not None else float(sigmas[0])
    sigmas = respaced(kind, lo, hi, steps)
    return sigma_to_t(sigmas, np.log(table)), sigmas


def euler_sigmas(config: Any, table: np.ndarray, steps: int, karras: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas without the final zero), as float64, for Euler-type samplers.

    ``karras``: re-space the sigmas as the config asks (Karras, exponential or beta; the name
    predates the other two). Euler ancestral passes False: its diffusers class has none.
    """
    timesteps = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, steps, config.steps_offset)
    sigmas = interpolated_sigmas(table, timesteps)
    kind = chosen_respacing(config) if karras else None
    if kind is None:
        return timesteps, sigmas
    return respace_sigmas(kind, sigmas, table, steps, config.sigma_min, config.sigma_max)


def custom_timesteps(config: Any, num_inference_steps: Any, timesteps: Any) -> np.ndarray | None:
    """Check ``set_timesteps``' arguments as diffusers does; the custom timesteps as float32, or None.

    One of the two, not both; and custom timesteps are not re-spaced, so a re-spacing flag
    refuses them (diffusers raises rather than silently ignore either).
    """
    if timesteps is None:
        check_steps(num_inference_steps)
        return None
    if num_inference_steps is not None:
        raise InputError("set_timesteps takes num_inference_steps or timesteps, not both.")
    kind = chosen_respacing(config)
    if kind is not None:
        raise InputError(f"custom timesteps cannot be used with config field {SIGMA_FLAGS[kind]!r} set.")
    refusal = InputError(f"custom timesteps must be a non-empty list of numbers, got {timesteps!r}.")
    try:
        values = np.asarray(np.array(timesteps) if isinstance(timesteps, mx.array) else timesteps, dtype=np.float64)
    except (TypeError, ValueError):
        raise refusal from None
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all():
        raise refusal
    return values.astype(np.float32)


class SigmaScheduler(Scheduler):
    """The schedule tables and model-input handling of the samplers on Euler's sigmas.

    Subclasses set ``timesteps`` and ``sigmas`` (with their final 0) through ``_set_tables``.
    """

    def __init__(self, config: BetaScheduleConfig | None = None):
        super().__init__(config)
        self._table = sigma_table(self.alphas_cumprod_np)

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

    def _set_tables(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        """Install float32 ``timesteps`` and ``sigmas`` (final entry included); restart the index."""
        self._timesteps_np = timesteps
        self.timesteps = mx.array(timesteps)
        self.sigmas_np = sigmas
        self.sigmas = mx.array(sigmas)
        s = sigmas
        # Per-sigma float32 scalars, each computed as diffusers' 0-d float32 tensor arithmetic does.
        self._input_scale = np.sqrt(s * s + np.float32(1.0))  # divides the model input
        self._v_out = -s / self._input_scale  # v-prediction: x0 = v * v_out + x / v_div
        self._v_div = s * s + np.float32(1.0)
        self._reset_index()

    def scale_model_input(self, sample: mx.array, timestep: Any) -> mx.array:
        """The UNet sees x / sqrt(sigma^2 + 1): unit variance, as in training."""
        i = self._current_index(timestep)
        return sample / float(self._input_scale[i])

    def _pred_original(self, model_output: mx.array, sample: mx.array, i: int) -> mx.array:
        """x0 from the model output at sigmas[i] (float32 inputs)."""
        sigma = float(self.sigmas_np[i])
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * float(self._v_out[i]) + sample / float(self._v_div[i])

    def add_noise(self, original_samples: mx.array, noise: mx.array, timesteps: Any) -> mx.array:
        """x + sigma(t) * noise, one sigma per batch item (img2img's starting latent)."""
        sigma = per_item(self.sigmas_np[self._add_noise_indices(timesteps)], original_samples)
        return original_samples + noise * sigma


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler sampler in MLX, step for step diffusers' ``EulerDiscreteScheduler``.

    ``timesteps`` are float32 (fractional with "linspace" spacing or re-spaced sigmas); ``sigmas``
    has one more entry than ``timesteps``, the final 0.
    """

    config_class = EulerDiscreteConfig
    takes_timesteps = True

    def __init__(self, config: EulerDiscreteConfig | None = None):
        super().__init__(config)
        # Before set_timesteps, as diffusers: the whole training schedule.
        train = np.linspace(0, self.config.num_train_timesteps - 1, self.config.num_train_timesteps)[::-1]
        self._set_schedule(train.astype(np.float32), self._table[::-1])
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: Any = None) -> None:
        """The schedule of ``num_inference_steps`` steps, or of the given ``timesteps`` (e.g.
        Align-Your-Steps; their sigmas interpolated from the training table, as diffusers)."""
        custom = custom_timesteps(self.config, num_inference_steps, timesteps)
        if custom is None:
            spaced, sigmas = euler_sigmas(self.config, self._table, num_inference_steps)
        else:
            spaced, sigmas = custom, interpolated_sigmas(self._table, custom)
        self._set_schedule(spaced.astype(np.float32), sigmas)
        self.num_inference_steps = len(custom) if custom is not None else num_inference_steps

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        """Install float32 ``timesteps`` and their ``sigmas``, to which the final 0 is added."""
        self._set_tables(timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32))

    def _check_timestep(self, timestep: Any) -> None:
        # diffusers refuses integer timesteps here: they usually are loop indices from enumerate().
        python_int = isinstance(timestep, int) and not isinstance(timestep, bool)
        if python_int or (isinstance(timestep, mx.array) and mx.issubdtype(timestep.dtype, mx.integer)):
            raise InputError(
                f"{type(self).__name__}.step() got an integer timestep {timestep!r}; pass a value of "
                "scheduler.timesteps (float), not a loop index."
            )

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
