"""DEIS multistep sampler (diffusers' ``DEISMultistepScheduler``: algorithm "deis", log-rho solver).

DEIS (Zhang & Chen 2023) integrates the probability-flow ODE exactly in rho = sigma / alpha
(the Euler-space sigma) with the noise prediction interpolated by a polynomial in log rho
through the last one to three model outputs. The weights are integrals of the Lagrange basis,
in closed form: they depend on the schedule only, so ``set_timesteps`` computes them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..configs.base import check_choice, check_number
from .base import BetaScheduleConfig, StepOutput
from .sigmas import chosen_respacing
from .base import rounded
from .unipc import LogSNRMultistepScheduler, _check_ends

# diffusers switches to lower orders near the end only for short schedules (fewer steps than this).
LOWER_ORDER_FINAL_BELOW = 15


@dataclass(frozen=True)
class DEISMultistepConfig(BetaScheduleConfig):
    """diffusers' ``DEISMultistepScheduler`` fields, defaults included.

    Implemented: solver_order 1-3, ``lower_order_final``, Karras / exponential / beta sigmas,
    epsilon / v_prediction. algorithm_type "dpmsolver" / "dpmsolver++" become "deis" and
    solver_type "midpoint" / "heun" / "bh1" / "bh2" become "logrho", as in diffusers.
    ``dynamic_thresholding_ratio`` and ``sample_max_value`` act only with ``thresholding``;
    ``flow_shift`` and ``time_shift_type`` only with flow sigmas or dynamic shifting: all
    refused, so those take any value.

    ``sigma_min`` / ``sigma_max`` are not DEIS parameters, but diffusers' re-spacings read them
    from the config when a file written by another scheduler carries them (``from_config``
    keeps such keys on the config): they set the re-spaced ends here too.
    """

    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "deis"
    solver_type: str = "logrho"
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = None
    sigma_max: float | None = None

    def _validate(self) -> None:
        super()._validate()
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        if self.algorithm_type in ("dpmsolver", "dpmsolver++"):
            object.__setattr__(self, "algorithm_type", "deis")
        check_choice("algorithm_type", self.algorithm_type, ("deis",))
        if self.solver_type in ("midpoint", "heun", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "logrho")
        check_choice("solver_type", self.solver_type, ("logrho",))
        for name in ("lower_order_final", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            self._flag(name)
        for name in ("thresholding", "use_flow_sigmas", "use_dynamic_shifting"):
            self._flag(name, (False,))
        chosen_respacing(self)
        _check_ends(self)
        check_number("flow_shift", self.flow_shift)


def _second_order_weight(t: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Antiderivative (in rho) of the Lagrange basis through log b, log c that is 1 at b,
    evaluated at t; float32 in diffusers' order of operations, with numpy's float32 log (not
    ``rounded``): diffusers calls np.log on its tensors here. The weights are differences of
    large, nearly equal terms that keep few digits in float32: they match diffusers' only
    from bit-identical sigmas (hence ``base.torch_linspace``)."""
    lt, lb, lc = np.log(t), np.log(b), np.log(c)
    return t * (-lc + lt - np.float32(1.0)) / (lb - lc)


def _third_order_weight(t: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """As ``_second_order_weight``, for the quadratic basis through log b, log c, log d."""
    lt, lb, lc, ld = np.log(t), np.log(b), np.log(c), np.log(d)
    one, two = np.float32(1.0), np.float32(2.0)
    numerator = t * (lc * (ld - lt + one) - ld * lt + ld + lt**2 - two * lt + two)
    return numerator / ((lb - lc) * (lb - ld))


class DEISMultistepScheduler(LogSNRMultistepScheduler):
    """DEIS in MLX, step for step diffusers'.

    The final sigma is never 0 (diffusers: the table's first sigma, or the last re-spaced sigma
    repeated, whose step does not move). ``pred_original_sample`` is the model's x0 estimate
    (diffusers does not return one).
    """

    config_class = DEISMultistepConfig

    def _precompute(self) -> None:
        """Per-step float32 coefficients. Step j goes from s0 = sigmas[j] to t = sigmas[j + 1].

        First order: x_t = (alpha_t / alpha_s0) x - sigma_t (e^h - 1) eps0. Orders 2 and 3:
        x_t = alpha_t (x / alpha_s0 + sum_k w_k eps_k), w_k the basis integral from rho_s0 to
        rho_t (NaN for steps without enough history: never used).
        """
        alpha, sigma, n = self._alpha, self._sigma, len(self._h)
        self._a1 = alpha[1:] / alpha[:-1]
        self._b1 = sigma[1:] * (rounded(np.exp, self._h) - np.float32(1.0))
        rho = sigma / alpha
        t, s0 = rho[1:], rho[:-1]
        s1 = np.concatenate([[np.nan], rho[:-2]]).astype(np.float32)
        s2 = np.concatenate([[np.nan, np.nan], rho[:-3]]).astype(np.float32)[:n]
        w2 = _second_order_weight
        self._w2 = np.stack([w2(t, s0, s1) - w2(s0, s0, s1), w2(t, s1, s0) - w2(s0, s1, s0)])
        w3 = _third_order_weight
        self._w3 = np.stack([
            w3(t, s0, s1, s2) - w3(s0, s0, s1, s2),
            w3(t, s1, s2, s0) - w3(s0, s1, s2, s0),
            w3(t, s2, s0, s1) - w3(s0, s2, s0, s1),
        ])

    def _order(self, i: int) -> int:
        """diffusers' choice: warm up one order per step; in short runs, lower the last two."""
        c, n = self.config, len(self._timesteps_np)
        short = c.lower_order_final and n < LOWER_ORDER_FINAL_BELOW
        if c.solver_order == 1 or self._lower_order_nums < 1 or (short and i == n - 1):
            return 1
        if c.solver_order == 2 or self._lower_order_nums < 2 or (short and i == n - 2):
            return 2
        return 3

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        """One DEIS step; ``noise`` is unused (the solver is deterministic)."""
        i = self._current_index(timestep)
        out_dtype = model_output.dtype
        sample = sample.astype(mx.float32)
        x0 = self._x0(model_output.astype(mx.float32), sample, i)
        # DEIS interpolates the noise: the model output goes through x0 and back, as in diffusers.
        eps = (sample - float(self._alpha[i]) * x0) / float(self._sigma[i])
        self._push(eps)

        order = self._order(i)
        if order == 1:
            prev = float(self._a1[i]) * sample - float(self._b1[i]) * eps
        else:
            weights = self._w2[:, i] if order == 2 else self._w3[:, i]
            prev = sample / float(self._alpha[i])
            for k, w in enumerate(weights, start=1):
                prev = prev + float(w) * self._outputs[-k]
            prev = float(self._alpha[i + 1]) * prev
        self._lower_order_nums = min(self._lower_order_nums + 1, self.config.solver_order)
        self._step_index = i + 1
        return StepOutput(prev.astype(out_dtype), x0)
