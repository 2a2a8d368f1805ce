"""DPM-Solver++ (2M) multistep sampler (diffusers' ``DPMSolverMultistepScheduler``).

The solver works on the model's denoised estimate x0 in log-SNR time lambda = log(alpha / sigma):
a first-order step is exact for a constant x0 over the interval; the second-order (midpoint)
step corrects it with the slope between this step's x0 and the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..configs.base import check_choice, check_number
from .base import (
    BetaScheduleConfig,
    Scheduler,
    StepOutput,
    check_steps,
    per_item,
    sigma_table,
    sigma_to_t,
)
from .sigmas import karras_sigmas


@dataclass(frozen=True)
class DPMSolverMultistepConfig(BetaScheduleConfig):
    """diffusers' ``DPMSolverMultistepScheduler`` fields, defaults included.

    Implemented: algorithm "dpmsolver++" of order 1 or 2 with the midpoint solver, Karras sigmas
    on or off, final sigma zero, epsilon / v_prediction. Fields that cannot act under those
    settings take any value: the thresholding knobs (``dynamic_thresholding_ratio``,
    ``sample_max_value``) need ``thresholding``; ``flow_shift`` and ``time_shift_type`` need flow
    sigmas or dynamic shifting; ``lower_order_final`` and ``euler_at_final`` only decide the
    order of the last steps, which a final sigma of zero already makes first-order (and for
    solver_order <= 2 that is the only step they touch).
    """

    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def _validate(self) -> None:
        super()._validate()
        check_choice("solver_order", self.solver_order, (1, 2))
        check_choice("algorithm_type", self.algorithm_type, ("dpmsolver++",))
        if self.solver_type in ("logrho", "bh1", "bh2"):
            # DEIS / UniPC solver names: diffusers' DPMSolverMultistep maps them to midpoint.
            object.__setattr__(self, "solver_type", "midpoint")
        check_choice("solver_type", self.solver_type, ("midpoint",))
        for name in ("use_karras_sigmas", "lower_order_final", "euler_at_final"):
            self._flag(name)
        for name in ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                     "use_flow_sigmas", "use_dynamic_shifting"):
            self._flag(name, (False,))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero",))
        # "learned" variances come with 2x channels that the solver would slice: not an SD/SDXL UNet.
        check_choice("variance_type", self.variance_type, (None,))
        check_number("lambda_min_clipped", self.lambda_min_clipped, finite=False)
        check_number("flow_shift", self.flow_shift)


def _alpha_sigma(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VP-space (alpha_t, sigma_t) of Euler-space sigmas, float32 as diffusers."""
    alpha = np.float32(1.0) / np.sqrt(s * s + np.float32(1.0))
    return alpha, s * alpha


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ 2M in MLX (``make_scheduler("dpmpp_2m" | "dpmpp_2m_karras")``).

    ``timesteps`` are integers (int32 here, int64 in diffusers); ``sigmas`` ends with 0. The model
    input needs no scaling (``init_noise_sigma`` is 1). The last step is first-order (x_0 is the
    model's own estimate), as diffusers does with a final sigma of zero. ``step`` keeps the
    previous x0 estimate: call ``set_timesteps`` before each new run.
    """

    config_class = DPMSolverMultistepConfig
    init_noise_sigma = 1.0

    def __init__(self, config: DPMSolverMultistepConfig | None = None):
        super().__init__(config)
        self._table = sigma_table(self.alphas_cumprod_np)
        # Before set_timesteps, as diffusers: training timesteps and the (ascending) sigma table.
        T = self.config.num_train_timesteps
        self._timesteps_np = np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy()
        self.timesteps = mx.array(self._timesteps_np)
        self.sigmas_np = self._table.copy()
        self.sigmas = mx.array(self.sigmas_np)
        self._prev_x0: mx.array | None = None
        self._lower_order_nums = 0

    def _last_timestep(self) -> int:
        """num_train_timesteps, less the steps whose log-SNR is below ``lambda_min_clipped``."""
        if self.config.lambda_min_clipped == -float("inf"):
            return self.config.num_train_timesteps
        alpha = np.sqrt(self.alphas_cumprod_np)
        sigma = np.sqrt(np.float32(1.0) - self.alphas_cumprod_np)
        lambdas = np.log(alpha) - np.log(sigma)
        clipped = int(np.searchsorted(lambdas[::-1], self.config.lambda_min_clipped, side="left"))
        return self.config.num_train_timesteps - clipped

    def _spaced_timesteps(self, steps: int) -> np.ndarray:
        # Not Euler's spacing: "linspace" and "leading" place steps + 1 points and drop the last (0).
        c, last = self.config, self._last_timestep()
        if c.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        if c.timestep_spacing == "leading":
            ratio = last // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + c.steps_offset
        ratio = c.num_train_timesteps / steps
        return np.arange(last, 0, -ratio).round().astype(np.int64) - 1

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps)
        timesteps = self._spaced_timesteps(num_inference_steps)
        if self.config.use_karras_sigmas:
            # Unlike Euler, the Karras ends are the whole training table's smallest and largest sigmas,
            # and the timesteps are rounded to integers.
            sigmas = karras_sigmas(float(self._table[0]), float(self._table[-1]), num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(self._table)).round().astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(len(self._table)), self._table)
        self._timesteps_np = timesteps
        self.timesteps = mx.array(timesteps.astype(np.int32))
        self.sigmas_np = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = mx.array(self.sigmas_np)
        self.num_inference_steps = len(timesteps)
        self._precompute()
        self._prev_x0 = None
        self._lower_order_nums = 0
        self._reset_index()

    def _precompute(self) -> None:
        """Per-step float32 coefficients, in diffusers' order of operations.

        Step i goes from sigma_s0 = sigmas[i] to sigma_t = sigmas[i + 1]; h is the log-SNR
        increment. First order: x_t = ratio * x - phi * D0 with ratio = sigma_t / sigma_s0 (VP
        sigmas) and phi = alpha_t (exp(-h) - 1). Second order adds - 0.5 phi D1, with
        D1 = (x0_i - x0_{i-1}) / r0 and r0 the ratio of the previous to the current increment.
        Towards sigma = 0, lambda -> inf and the step returns x0 exactly, as in diffusers.
        """
        s = self.sigmas_np
        alpha, sigma = _alpha_sigma(s)
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at the final sigma 0
            h = lam[1:] - lam[:-1]
            self._alpha_s = alpha[:-1]
            self._sigma_s = sigma[:-1]
            self._ratio = sigma[1:] / sigma[:-1]
            self._phi = alpha[1:] * (np.exp(-h) - np.float32(1.0))
            inv_r0 = np.full_like(h, np.nan)
            if len(h) > 1:
                r0 = (lam[1:-1] - lam[:-2]) / h[1:]  # h_0 / h for steps 1..n-1
                inv_r0[1:] = np.float32(1.0) / r0
        self._inv_r0 = inv_r0

    def _missing_timestep(self, timestep: float) -> int:
        # diffusers' DPM-Solver falls back to the last step for an unknown timestep.
        return len(self._timesteps_np) - 1

    def scale_model_input(self, sample: mx.array, timestep: Any = None) -> mx.array:
        """Identity: the solver works on unscaled samples."""
        return sample

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        """One DPM-Solver++ step; ``noise`` is unused (the 2M solver is deterministic).

        ``pred_original_sample`` is the x0 estimate the solver used (diffusers does not return it).
        """
        i = self._current_index(timestep)
        out_dtype = model_output.dtype
        sample = sample.astype(mx.float32)
        model_output = model_output.astype(mx.float32)
        alpha_s, sigma_s = float(self._alpha_s[i]), float(self._sigma_s[i])
        if self.config.prediction_type == "epsilon":
            x0 = (sample - sigma_s * model_output) / alpha_s
        else:  # v_prediction
            x0 = alpha_s * sample - sigma_s * model_output

        last = i == len(self._timesteps_np) - 1  # final sigma 0: always first order
        ratio, phi = float(self._ratio[i]), float(self._phi[i])
        if self.config.solver_order == 1 or self._lower_order_nums < 1 or last or self._prev_x0 is None:
            prev = ratio * sample - phi * x0
        else:
            d1 = float(self._inv_r0[i]) * (x0 - self._prev_x0)
            prev = ratio * sample - phi * x0 - (0.5 * phi) * d1
        self._prev_x0 = x0
        self._lower_order_nums = min(self._lower_order_nums + 1, self.config.solver_order)
        self._step_index = i + 1
        return StepOutput(prev.astype(out_dtype), x0)

    def add_noise(self, original_samples: mx.array, noise: mx.array, timesteps: Any) -> mx.array:
        """alpha_t x + sigma_t noise (VP form), one timestep per batch item."""
        sigma = per_item(self.sigmas_np[self._add_noise_indices(timesteps)], original_samples)
        alpha_t = 1 / mx.sqrt(sigma * sigma + 1)
        return alpha_t * original_samples + (sigma * alpha_t) * noise
