"""Linear multistep sampler (diffusers' ``LMSDiscreteScheduler``, k-diffusion's ``sample_lms``).

An Adams-Bashforth method in sigma: each step integrates, from sigma_i to sigma_{i+1}, the
polynomial through the last few derivatives dx/dsigma = (x - x0) / sigma (at sigma_i,
sigma_{i-1}, ...). The integral is a weighted sum of those derivatives; the weights depend only
on the sigmas, so they are computed once per schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from numpy.polynomial import polynomial as P

from ..errors import InputError
from .base import BetaScheduleConfig, StepOutput, check_steps, parse_config, spaced_timesteps
from .euler import SigmaScheduler, check_respacing, interpolated_sigmas, respace_sigmas
from .sigmas import chosen_respacing

LMS_ORDER = 4  # the default of diffusers' ``step(..., order=4)``


@dataclass(frozen=True)
class LMSDiscreteConfig(BetaScheduleConfig):
    """diffusers' ``LMSDiscreteScheduler`` fields, defaults included.

    Implemented: linear / scaled_linear / trained betas, epsilon and v_prediction, the three
    timestep spacings, steps_offset, Karras, exponential or beta sigmas.

    ``sigma_min`` / ``sigma_max`` are not parameters of diffusers' class, but its ``from_config``
    keeps any key it is given in ``config``, and its exponential and beta re-spacings read
    ``config.sigma_min`` / ``config.sigma_max`` when present (its Karras one does not).
    ``rescale_betas_zero_snr`` is no parameter either, and nothing reads it: any value is taken
    and stands for False.
    """

    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None

    def _validate(self) -> None:
        self._flag("rescale_betas_zero_snr")
        object.__setattr__(self, "rescale_betas_zero_snr", False)
        super()._validate()
        check_respacing(self)


def lms_coefficients(sigmas: np.ndarray, order: int) -> list[tuple[float, ...]]:
    """The weights of each step, float64: ``weights[i][j]`` multiplies the derivative at sigma_{i-j}.

    Step i uses the last m = min(i + 1, order) derivatives. Weight j is the integral from sigma_i
    to sigma_{i+1} of the Lagrange basis polynomial that is 1 at sigma_{i-j} and 0 at the other
    nodes. diffusers integrates it numerically (scipy's quad, evaluating it in float32); it has
    degree m - 1, so it is integrated exactly here: built as coefficients in u = sigma - sigma_i
    (so that the integral starts at 0, without cancellation), all steps of one m at once.
    """
    s = sigmas.astype(np.float64)
    steps = len(s) - 1
    weights: list[tuple[float, ...]] = [()] * steps
    for m in range(1, order + 1):
        # Only step m - 1 has m derivatives, until m reaches the order: then all later steps do.
        rows = np.arange(m - 1, steps if m == order else min(m, steps))
        if len(rows) == 0:
            continue
        start = s[rows]
        nodes = [s[rows - k] - start for k in range(m)]
        table = np.empty((len(rows), m))
        # A repeated sigma (clamped "leading" timesteps) makes a basis undefined: nan, as diffusers'.
        with np.errstate(divide="ignore", invalid="ignore"):
            for j in range(m):
                basis = np.ones((1, len(rows)))  # coefficient k of u**k in row k, one column per step
                for k in range(m):
                    if k != j:  # times (u - node_k) / (node_j - node_k)
                        grown = np.zeros((len(basis) + 1, len(rows)))
                        grown[1:] += basis
                        grown[:-1] -= basis * nodes[k]
                        basis = grown / (nodes[j] - nodes[k])
                table[:, j] = P.polyval(s[rows + 1] - start, P.polyint(basis, axis=0), tensor=False)
        for row, values in zip(rows, table):
            weights[row] = tuple(float(w) for w in values)
    return weights


class LMSDiscreteScheduler(SigmaScheduler):
    """LMS sampler in MLX, step for step diffusers' ``LMSDiscreteScheduler``.

    ``lms_order`` is the number of derivatives combined (diffusers' ``step(..., order=4)``, a
    setting of the sampler here, fixed at construction); ``order``, what a pipeline reads to
    start img2img, is diffusers' 1. ``timesteps`` are float32; ``sigmas`` ends with 0. ``step``
    keeps the past derivatives: call ``set_timesteps`` before each new run.
    """

    config_class = LMSDiscreteConfig

    def __init__(self, config: LMSDiscreteConfig | None = None, lms_order: int = LMS_ORDER):
        if isinstance(lms_order, bool) or not isinstance(lms_order, int) or lms_order < 1:
            raise InputError(f"lms_order must be a positive integer, got {lms_order!r}.")
        super().__init__(config)
        self._lms_order = lms_order
        # As diffusers: until set_timesteps, the schedule of num_train_timesteps steps.
        self.set_timesteps(self.config.num_train_timesteps)

    @classmethod
    def from_config(cls, config: Any = None, *, lms_order: int = LMS_ORDER, **overrides: Any) -> "LMSDiscreteScheduler":
        """As ``Scheduler.from_config``, with the ``lms_order`` setting."""
        return cls(parse_config(cls.config_class, {} if config is None else config, overrides), lms_order)

    @property
    def lms_order(self) -> int:
        return self._lms_order

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps)
        c = self.config
        timesteps = spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset)
        sigmas = interpolated_sigmas(self._table, timesteps)
        kind = chosen_respacing(c)
        if kind is not None:
            # diffusers' LMS takes its Karras ends from the spaced schedule only; the exponential
            # and beta re-spacings honour config sigma_min / sigma_max.
            ends = (None, None) if kind == "karras" else (c.sigma_min, c.sigma_max)
            timesteps, sigmas = respace_sigmas(kind, sigmas, self._table, num_inference_steps, *ends)
        self._set_tables(timesteps.astype(np.float32), np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.num_inference_steps = num_inference_steps
        # From the float32 sigmas, the ones diffusers integrates between.
        self._weights = lms_coefficients(self.sigmas_np, self._lms_order)
        self._derivatives: list[mx.array] = []

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        """One LMS step; ``noise`` is unused (the sampler is deterministic).

        Computed in float32; ``prev_sample`` comes back in the model output's dtype,
        ``pred_original_sample`` in float32.
        """
        i = self._current_index(timestep)
        sample = sample.astype(mx.float32)
        x0 = self._pred_original(model_output.astype(mx.float32), sample, i)
        self._derivatives.append((sample - x0) / float(self.sigmas_np[i]))
        if len(self._derivatives) > self._lms_order:
            self._derivatives.pop(0)
        # diffusers picks the weights by step index and pairs them with the derivatives it has,
        # newest first, as far as the shorter list goes: a run entered midway (img2img) takes the
        # first weights of a higher-order formula than its history supports. Reproduced.
        update = None
        for weight, derivative in zip(self._weights[i], reversed(self._derivatives)):
            term = derivative * weight
            update = term if update is None else update + term
        prev = sample + update
        self._step_index = i + 1
        return StepOutput(prev.astype(model_output.dtype), x0)
