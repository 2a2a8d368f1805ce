"""UniPC multistep sampler (diffusers' ``UniPCMultistepScheduler``), and what DEIS shares with it.

UniPC (Zhao et al. 2023) is an exponential-integrator multistep solver in log-SNR time
lambda = log(alpha / sigma). Each step first *corrects* the sample it was handed (UniC: the
model has now been evaluated there, so the previous step is redone with that new value in the
interpolation), then *predicts* the next sample (UniP) from the last few model outputs. Both
are "B(h)" updates whose weights solve a small linear system in the ratios of past log-SNR
increments: those depend on the schedule only, so they are all solved once, in numpy, by
``set_timesteps``; ``step`` combines stored outputs with precomputed float32 scalars.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..configs.base import check_choice, check_number
from ..errors import ConfigError
from .base import (
    BetaScheduleConfig,
    StepOutput,
    check_steps,
    rounded,
    sigma_to_t,
)
from .log_snr import LogSNRScheduler, alpha_sigma_lambda, data_estimate
from .sigmas import chosen_respacing, respaced

# ----------------------------------------------------------------------- shared with DEIS


def multistep_schedule(config: Any, table: np.ndarray, steps: int, final_zero: bool) -> tuple[np.ndarray, np.ndarray]:
    """(int64 timesteps, float32 sigmas with the final one appended) as UniPC / DEIS build them.

    ``table`` is the ascending float32 training sigma table. "linspace" and "leading" place
    steps + 1 points and drop the last (timestep 0), unlike Euler's spacing. A re-spacing runs
    between the config's ``sigma_min`` / ``sigma_max`` when set, else the whole table's ends (not
    the spaced schedule's); its timesteps are rounded for Karras but *truncated* for exponential
    and beta (diffusers casts their fractional timesteps to int64 without rounding). The final
    sigma is 0 (``final_zero``), else the table's first for the plain spacing and the last
    re-spaced sigma repeated (a last step that does not move) for the others.
    """
    c, T = config, config.num_train_timesteps
    if c.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif c.timestep_spacing == "leading":
        ratio = T // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + c.steps_offset
    else:  # trailing
        timesteps = np.arange(T, 0, -T / steps).round().astype(np.int64) - 1
    kind = chosen_respacing(c)
    if kind is None:
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        last = table[0]
    else:
        lo = c.sigma_min if c.sigma_min is not None else float(table[0])
        hi = c.sigma_max if c.sigma_max is not None else float(table[-1])
        sigmas = respaced(kind, lo, hi, steps)
        fractional = sigma_to_t(sigmas, np.log(table))
        timesteps = (fractional.round() if kind == "karras" else fractional).astype(np.int64)
        last = sigmas[-1]
    sigmas = np.concatenate([sigmas, [0.0 if final_zero else last]]).astype(np.float32)
    return timesteps, sigmas


class LogSNRMultistepScheduler(LogSNRScheduler):
    """What UniPC and DEIS share beyond ``LogSNRScheduler``: the schedule and the past outputs."""

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._outputs: list[mx.array] = []
        self._lower_order_nums = 0

    final_zero = False  # whether the last step goes to sigma 0 (else the schedule's own last sigma)

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps)
        timesteps, self.sigmas_np = multistep_schedule(self.config, self._table, num_inference_steps, self.final_zero)
        self._timesteps_np = timesteps
        self.timesteps = mx.array(timesteps.astype(np.int32))
        self.sigmas = mx.array(self.sigmas_np)
        self.num_inference_steps = len(timesteps)
        self._alpha, self._sigma, self._lambda = alpha_sigma_lambda(self.sigmas_np)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # h[j]: the log-SNR increment of step j.
            self._h = self._lambda[1:] - self._lambda[:-1]
            self._precompute()  # the subclass's per-step solver coefficients
        self._outputs = []
        self._lower_order_nums = 0
        self._reset_index()

    def _x0(self, model_output: mx.array, sample: mx.array, i: int) -> mx.array:
        """The model's x0 estimate at step i (float32 inputs)."""
        return data_estimate(self.config.prediction_type, model_output, sample, float(self._alpha[i]),
                             float(self._sigma[i]))

    def _push(self, output: mx.array) -> None:
        """Keep the last ``solver_order`` converted model outputs, newest last."""
        self._outputs = (self._outputs + [output])[-self.config.solver_order:]

def _check_ends(config: Any) -> None:
    """The re-spaced ends, when configured, are noise levels: positive."""
    for name in ("sigma_min", "sigma_max"):
        if getattr(config, name) is not None:
            check_number(name, getattr(config, name), positive=True)


def _refuse(name: str, value: Any, why: str) -> None:
    raise ConfigError(f"config field {name!r} = {value!r} is not supported by mlx_unet {why}.")


# ----------------------------------------------------------------------- UniPC


@dataclass(frozen=True)
class UniPCMultistepConfig(BetaScheduleConfig):
    """diffusers' ``UniPCMultistepScheduler`` fields, defaults included (``disable_corrector``
    is a tuple here: diffusers' ``[]`` default, immutable).

    Implemented: solver_order 1-3, predict_x0 on / off, solver_type bh1 / bh2 (the DPM-Solver and
    DEIS names "midpoint", "heun", "logrho" become bh2, as in diffusers), the corrector with
    ``disable_corrector``, ``lower_order_final``, Karras / exponential / beta sigmas between
    ``sigma_min`` / ``sigma_max`` (or the table's ends), final sigma zero or sigma_min,
    epsilon / v_prediction. ``dynamic_thresholding_ratio`` and ``sample_max_value`` act only
    with ``thresholding``; ``flow_shift`` and ``time_shift_type`` only with flow sigmas or
    dynamic shifting: all refused, so those take any value.

    Refused as well, because diffusers' own run is not finite: with a final sigma of zero, the
    last step reaches lambda = inf, where bh1's B(h) = h, the noise-prediction form
    (predict_x0 False) and any order above one (lower_order_final False) give NaN or inf; with
    a repeated final sigma (re-spaced schedules, sigma_min), an order-3 last step solves a
    singular system.
    """

    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    solver_p: Any = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    def _validate(self) -> None:
        super()._validate()
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        if self.solver_type in ("midpoint", "heun", "logrho"):
            object.__setattr__(self, "solver_type", "bh2")
        check_choice("solver_type", self.solver_type, ("bh1", "bh2"))
        for name in ("predict_x0", "lower_order_final", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            self._flag(name)
        for name in ("thresholding", "use_flow_sigmas", "use_dynamic_shifting"):
            self._flag(name, (False,))
        chosen_respacing(self)
        corrector = () if self.disable_corrector is None else self.disable_corrector
        if not isinstance(corrector, (list, tuple)) or any(isinstance(k, bool) or not isinstance(k, int) for k in corrector):
            _refuse("disable_corrector", self.disable_corrector, "(it must list step indices)")
        object.__setattr__(self, "disable_corrector", tuple(corrector))
        # Another scheduler object as the predictor: not something a config file can hold.
        check_choice("solver_p", self.solver_p, (None,))
        # diffusers refuses shift_terminal itself without flow sigmas.
        check_choice("shift_terminal", self.shift_terminal, (None,))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        _check_ends(self)
        check_number("flow_shift", self.flow_shift)
        if self.final_sigmas_type == "zero":
            why = "with final_sigmas_type 'zero' (diffusers' last step then returns NaN; use 'sigma_min')"
            if self.solver_type == "bh1":
                _refuse("solver_type", "bh1", why)
            if not self.predict_x0:
                _refuse("predict_x0", False, why)
            if not self.lower_order_final and self.solver_order > 1:
                _refuse("lower_order_final", False, why)
        elif self.solver_order == 3 and not self.lower_order_final and chosen_respacing(self):
            _refuse("lower_order_final", False, "with solver_order 3, a re-spaced schedule and final_sigmas_type "
                    "'sigma_min' (the repeated last sigma makes diffusers' last step singular)")


class UniPCMultistepScheduler(LogSNRMultistepScheduler):
    """UniPC (predictor UniP, corrector UniC) in MLX, step for step diffusers'.

    ``pred_original_sample`` is the model's x0 estimate at this step, from the sample as handed
    in (before the corrector); diffusers does not return one.
    """

    config_class = UniPCMultistepConfig

    def __init__(self, config: UniPCMultistepConfig | None = None):
        super().__init__(config)
        self._last_sample: mx.array | None = None
        self._this_order = 0

    @property
    def final_zero(self) -> bool:
        return self.config.final_sigmas_type == "zero"

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        self._last_sample = None
        self._this_order = 0

    def _precompute(self) -> None:
        """Per-step float32 coefficients, in diffusers' order of operations (numpy ``errstate``
        off: intervals a run never uses may hold inf / NaN, as diffusers' would).

        Interval j goes from s0 = sigmas[j] to t = sigmas[j + 1]; the predictor of step j and the
        corrector of step j + 1 both move over it: x_t = a x - c m0 - d (sum_k rho_k D_k), with
        m0 the newest converted output, D_k = (m_k - m0) / r_k the differences to older ones,
        r_k = (lambda_{j-k} - lambda_j) / h, and (in the corrector) a last term with the output
        at t. hh = -h for x0 outputs, +h for noise outputs; B(h) = hh (bh1) or e^hh - 1 (bh2).
        """
        c = self.config
        order, n = c.solver_order, len(self._h)
        alpha, sigma, lam, h = self._alpha, self._sigma, self._lambda, self._h
        hh = -h if c.predict_x0 else h
        h_phi_1 = rounded(np.expm1, hh)
        b_h = hh if c.solver_type == "bh1" else h_phi_1  # e^hh - 1 again
        outer = sigma if c.predict_x0 else alpha  # the sample's decay factor, a = outer_t / outer_s0
        inner = alpha if c.predict_x0 else sigma
        self._a = outer[1:] / outer[:-1]
        self._c = inner[1:] * h_phi_1
        self._d = inner[1:] * b_h
        # r[j, k - 1] for k = 1 .. order - 1 (NaN where the history does not reach back that far).
        self._r = np.full((n, max(order - 1, 1)), np.nan, np.float32)
        for k in range(1, order):
            self._r[k:, k - 1] = (lam[: n - k] - lam[k:n]) / h[k:]
        # The right-hand side b_m = m! phi_{m+1}(hh) hh / B(h), by diffusers' float32 recurrence
        # phi_{m+1} = phi_m / hh - 1 / m! (the cancellation for small h is part of the result).
        b = np.empty((order, n), np.float32)
        h_phi_k, factorial = h_phi_1 / hh - np.float32(1.0), 1
        for m in range(order):
            b[m] = h_phi_k * np.float32(factorial) / b_h
            factorial *= m + 2
            h_phi_k = h_phi_k / hh - np.float32(1.0 / factorial)
        # rhos_p[j, p]: predictor weights of order p (p - 1 of them); rhos_c[j, p]: corrector's (p).
        self._rhos_p = np.full((n, order + 1, order), np.nan, np.float32)
        self._rhos_c = np.full((n, order + 1, order), np.nan, np.float32)
        self._rhos_c[:, 1, 0] = 0.5  # order 1: fixed, not solved (diffusers)
        if order >= 2:
            self._rhos_p[:, 2, 0] = 0.5  # order 2 predictor: fixed as well
        for j in range(n):
            for p in range(2, min(order, j + 1) + 1):
                rks = np.append(self._r[j, : p - 1], np.float32(1.0))
                system = np.stack([rks**m for m in range(p)])  # rows: powers 0 .. p-1 of r
                self._rhos_c[j, p, :p] = _solve(system, b[:p, j])
                if p == 3:
                    self._rhos_p[j, p, : p - 1] = _solve(system[:-1, :-1], b[: p - 1, j])

    def _differences(self, j: int, outputs: list[mx.array], rhos: np.ndarray) -> mx.array:
        """sum_k rho_k (m_k - m0) / r_k over the older outputs, m_k = outputs[-1 - k]."""
        m0, total = outputs[-1], None
        for k, rho in enumerate(rhos, start=1):
            term = float(rho) * ((outputs[-1 - k] - m0) / float(self._r[j, k - 1]))
            total = term if total is None else total + term
        return total

    def _convert(self, model_output: mx.array, sample: mx.array, i: int) -> mx.array:
        """What the solver interpolates: x0 (predict_x0) or the noise, from the model output."""
        if self.config.predict_x0:
            return self._x0(model_output, sample, i)
        if self.config.prediction_type == "epsilon":
            return model_output
        return float(self._alpha[i]) * model_output + float(self._sigma[i]) * sample  # v -> noise

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        """One UniPC step (UniC on ``sample``, then UniP); ``noise`` is unused (deterministic)."""
        i = self._current_index(timestep)
        c = self.config
        out_dtype = model_output.dtype
        sample = sample.astype(mx.float32)
        model_output = model_output.astype(mx.float32)
        converted = self._convert(model_output, sample, i)
        x0 = converted if c.predict_x0 else self._x0(model_output, sample, i)

        # diffusers skips the corrector only on the first step of a run and where disabled.
        if i > 0 and (i - 1) not in c.disable_corrector and self._last_sample is not None:
            j, p, m0 = i - 1, self._this_order, self._outputs[-1]
            rhos = self._rhos_c[j, p, :p]
            correction = float(rhos[-1]) * (converted - m0)
            if p > 1:
                correction = self._differences(j, self._outputs, rhos[:-1]) + correction
            sample = float(self._a[j]) * self._last_sample - float(self._c[j]) * m0 - float(self._d[j]) * correction
        self._push(converted)

        # Order: warm up one step at a time; with lower_order_final, never reach past the end.
        order = min(c.solver_order, len(self._timesteps_np) - i) if c.lower_order_final else c.solver_order
        self._this_order = p = min(order, self._lower_order_nums + 1)
        self._last_sample = sample
        prev = float(self._a[i]) * sample - float(self._c[i]) * converted
        if p > 1:
            prev = prev - float(self._d[i]) * self._differences(i, self._outputs, self._rhos_p[i, p, : p - 1])
        self._lower_order_nums = min(self._lower_order_nums + 1, c.solver_order)
        self._step_index = i + 1
        return StepOutput(prev.astype(out_dtype), x0)


def _solve(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """float32 LU solve (LAPACK sgesv, as torch.linalg.solve on float32); NaN where singular
    (only on intervals a run cannot use: refused configs, or a repeated final sigma)."""
    try:
        return np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:
        return np.full(len(rhs), np.nan, np.float32)
