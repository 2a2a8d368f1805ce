"""DPM-Solver++ multistep samplers (diffusers' ``DPMSolverMultistepScheduler``): 2M, 3M, 2M SDE, 3M SDE.

The solver works on the model's denoised estimate x0 in log-SNR time lambda = log(alpha / sigma):
a first-order step is exact for a constant x0 over the interval; the second-order step corrects it
with the slope between this step's x0 and the previous one ("midpoint" or "heun" form of the
correction), the third-order step with the curvature over the last three. The SDE form
(``algorithm_type="sde-dpmsolver++"``) integrates the reverse SDE instead: the sample decays by a
further exp(-h) and fresh noise is injected at every step.

Every update is linear in its inputs: x_t = A x_s + sum_k w_k x0_k + N noise, with A, w_k and N
depending on the schedule only. They are tabulated per step and per order in ``set_timesteps``, in
float32 and in diffusers' order of operations, so ``step`` is a handful of multiply-adds. The
single-step solver (dpm_singlestep.py) shares this module's config fields, schedule and formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from ..configs.base import check_choice, check_number
from ..errors import InputError
from .base import (
    BetaScheduleConfig,
    StepOutput,
    check_steps,
    rounded,
    sigma_to_t,
    step_noise,
)
from .log_snr import LogSNRScheduler, alpha_sigma_lambda, data_estimate
from .sigmas import chosen_respacing, respaced

# The sigma re-spacings diffusers' DPM-Solvers offer, all implemented.
RESPACING_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@dataclass(frozen=True)
class DPMSolverConfig(BetaScheduleConfig):
    """The fields diffusers' two DPM-Solver classes share, defaults included.

    Implemented: algorithm "dpmsolver++" and "sde-dpmsolver++", orders 1 to 3, midpoint and heun
    solvers, Karras / exponential / beta sigmas, ``lambda_min_clipped``, final sigma zero, epsilon
    and v_prediction. Fields that cannot act under those settings take any value: the thresholding
    knobs (``dynamic_thresholding_ratio``, ``sample_max_value``) need ``thresholding``;
    ``flow_shift`` and ``time_shift_type`` need flow sigmas or dynamic shifting.
    """

    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def _validate(self) -> None:
        super()._validate()
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        # "dpmsolver" / "sde-dpmsolver" (noise-prediction forms) need final_sigmas_type "sigma_min";
        # diffusers refuses "deis" with a zero final sigma too, though it maps the name to dpmsolver++.
        check_choice("algorithm_type", self.algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        if self.solver_type in ("logrho", "bh1", "bh2"):
            # DEIS / UniPC solver names: diffusers' DPM-Solvers map them to midpoint.
            object.__setattr__(self, "solver_type", "midpoint")
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        for name in ("lower_order_final", *RESPACING_FLAGS):
            self._flag(name)
        for name in ("thresholding", "use_flow_sigmas", "use_dynamic_shifting"):
            self._flag(name, (False,))
        chosen_respacing(self)  # at most one re-spacing, as diffusers checks at construction
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero",))
        # "learned" variances come with 2x channels that the solver would slice: not an SD/SDXL UNet.
        check_choice("variance_type", self.variance_type, (None,))
        check_number("lambda_min_clipped", self.lambda_min_clipped, finite=False)
        check_number("flow_shift", self.flow_shift)


@dataclass(frozen=True)
class DPMSolverMultistepConfig(DPMSolverConfig):
    """diffusers' ``DPMSolverMultistepScheduler`` fields (see ``DPMSolverConfig``).

    ``lower_order_final`` acts as in diffusers: with fewer than 15 steps, third order drops to
    second order on the second-to-last step. The last step is always first order, as diffusers
    makes it with a final sigma of zero, whatever ``lower_order_final`` and ``euler_at_final``
    say: ``euler_at_final`` therefore cannot act and takes any boolean.
    """

    euler_at_final: bool = False
    use_lu_lambdas: bool = False

    def _validate(self) -> None:
        super()._validate()
        self._flag("euler_at_final")
        self._flag("use_lu_lambdas", (False,))


# ------------------------------------------------------------------- shared schedule and formulas


def last_timestep(config: DPMSolverConfig, alphas_cumprod_: np.ndarray) -> int:
    """num_train_timesteps, less the steps whose log-SNR is below ``lambda_min_clipped``."""
    if config.lambda_min_clipped == -float("inf"):
        return config.num_train_timesteps
    lambdas = rounded(np.log, np.sqrt(alphas_cumprod_)) - rounded(np.log, np.sqrt(np.float32(1.0) - alphas_cumprod_))
    clipped = int(np.searchsorted(lambdas[::-1], config.lambda_min_clipped, side="left"))
    return config.num_train_timesteps - clipped


def linspace_timesteps(last: int, steps: int) -> np.ndarray:
    """``steps`` + 1 rounded points over [0, last - 1], descending, the final 0 dropped."""
    return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


def custom_timesteps(config: DPMSolverConfig, timesteps: Any) -> np.ndarray:
    """Caller-given timesteps (Align-Your-Steps lists) as int64, checked as far as they can be used."""
    for flag in RESPACING_FLAGS:
        if getattr(config, flag):  # diffusers refuses the combination too
            raise InputError(f"custom timesteps cannot be combined with {flag}.")
    values = np.asarray(np.array(timesteps) if isinstance(timesteps, mx.array) else timesteps)
    last = config.num_train_timesteps - 1
    usable = values.ndim == 1 and values.size > 0 and np.issubdtype(values.dtype, np.number)
    if not (usable and np.all(values == np.round(values)) and values.min() >= 0 and values.max() <= last):
        raise InputError(f"custom timesteps must be a non-empty list of integers in [0, {last}], got {timesteps!r}.")
    return values.astype(np.int64)


def dpm_sigmas(
    config: DPMSolverConfig, table: np.ndarray, timesteps: np.ndarray, steps: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(int64 timesteps, float32 sigmas ending with 0) from spaced or custom ``timesteps``.

    A re-spacing places ``steps`` sigmas (the requested count: "trailing" spacing yields an extra
    timestep for some counts) over the whole training table, whose ends both classes take, not
    the spaced schedule's. The timesteps are mapped back from them: rounded for Karras, but
    truncated towards zero for exponential and beta sigmas, which diffusers leaves fractional
    until its int64 cast. Reproduced, so that the timesteps given to the UNet stay identical.
    """
    kind = chosen_respacing(config)
    if kind is None:
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
    else:
        sigmas = respaced(kind, float(table[0]), float(table[-1]), steps)
        fractional = sigma_to_t(sigmas, np.log(table))
        timesteps = (fractional.round() if kind == "karras" else fractional).astype(np.int64)
    return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def back(x: np.ndarray, k: int) -> np.ndarray:
    """x[i - k] at index i, NaN before the start: the schedule k steps back."""
    return np.concatenate([np.full(k, np.nan, np.float32), x[: len(x) - k]])


class Terms(NamedTuple):
    """One update's float32 scalars from sigma_s to sigma_t over the log-SNR span h.

    x_t = A x_s + c0 D0 + c1 D1 (+ c2 D2) + N noise, D0 being an x0 estimate, D1 and D2 its first
    and second divided differences. ``c_mid`` is the midpoint solver's D1 coefficient; ``c_lin``
    the heun solver's, which the third-order formulas use for D1 too; ``c_quad`` multiplies D2.
    """

    A: np.ndarray
    N: np.ndarray
    c0: np.ndarray
    c_mid: np.ndarray
    c_lin: np.ndarray
    c_quad: np.ndarray


def solver_terms(algorithm: str, alpha_t, sigma_t, sigma_s, h) -> Terms:
    """``Terms`` as diffusers evaluates its formulas (float32 0-d tensors, left to right)."""
    one = np.float32(1.0)
    if algorithm == "dpmsolver++":  # the ODE
        e = rounded(np.exp, -h) - one
        return Terms(A=sigma_t / sigma_s, N=np.zeros_like(h), c0=-(alpha_t * e), c_mid=-(0.5 * (alpha_t * e)),
                     c_lin=alpha_t * (e / h + one), c_quad=-(alpha_t * ((e + h) / h**2 - 0.5)))
    # sde-dpmsolver++: the sample decays by a further exp(-h), and noise of variance
    # sigma_t^2 (1 - exp(-2h)) replaces what the step removed.
    f = one - rounded(np.exp, -2.0 * h)
    return Terms(A=sigma_t / sigma_s * rounded(np.exp, -h), N=sigma_t * np.sqrt(one - rounded(np.exp, -2.0 * h)), c0=alpha_t * f,
                 c_mid=0.5 * (alpha_t * f), c_lin=alpha_t * (f / (-2.0 * h) + one),
                 c_quad=alpha_t * ((f - 2.0 * h) / (2.0 * h) ** 2 - 0.5))


def folded(*columns: np.ndarray) -> np.ndarray:
    """Per-step weights on the x0 estimates (newest first), folded in float64, stored float32.

    One weight per estimate instead of diffusers' divided differences: it moves the rounding by
    float32 ulps of the terms, and leaves ``step`` one multiply-add per estimate.
    """
    return np.stack([c.astype(np.float64) for c in columns], axis=1).astype(np.float32)


# ------------------------------------------------------------------- the samplers


class DPMSolverBase(LogSNRScheduler):
    """What the two DPM-Solver++ samplers share: tables, x0 estimate, the linear update, add_noise.

    ``timesteps`` are integers (int32 here, int64 in diffusers); ``sigmas`` ends with 0. The model
    input needs no scaling (``init_noise_sigma`` is 1). The SDE form is ``stochastic``: its
    ``step`` takes standard normal ``noise`` of the sample's shape, or draws it with mx.random.
    ``step`` keeps earlier x0 estimates: call ``set_timesteps`` before each new run. A subclass
    spaces the timesteps (``_spaced_timesteps``) and tabulates its updates (``_tables``: order ->
    (A, N, W) per step, W the weights on the x0 estimates, newest first).
    """

    takes_timesteps = True

    def __init__(self, config: DPMSolverConfig | None = None):
        super().__init__(config)
        self.stochastic = self.config.algorithm_type == "sde-dpmsolver++"
        self._x0s: list[mx.array] = []

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: Any = None) -> None:
        """Space ``num_inference_steps`` steps, or take the given ``timesteps`` (one of the two)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise InputError("pass exactly one of num_inference_steps and timesteps.")
        if timesteps is None:
            check_steps(num_inference_steps)
            spaced = self._spaced_timesteps(num_inference_steps)
        else:
            spaced = custom_timesteps(self.config, timesteps)
        self._timesteps_np, self.sigmas_np = dpm_sigmas(self.config, self._table, spaced, num_inference_steps)
        self.timesteps = mx.array(self._timesteps_np.astype(np.int32))
        self.sigmas = mx.array(self.sigmas_np)
        self.num_inference_steps = len(self._timesteps_np)
        alpha, sigma, lam = alpha_sigma_lambda(self.sigmas_np)
        self._alpha_s, self._sigma_s = alpha[:-1], sigma[:-1]  # for the x0 estimate
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # inf / NaN land only in entries no step uses: past the schedule's start, or higher
            # orders on the last step, which is always first order.
            self._coefficients = self._tables(alpha, sigma, lam)
        self._x0s = []
        self._reset_index()

    def _x0(self, model_output: mx.array, sample: mx.array, i: int) -> mx.array:
        """The data estimate from the model output at step i (float32), kept newest first."""
        x0 = data_estimate(self.config.prediction_type, model_output, sample, float(self._alpha_s[i]),
                           float(self._sigma_s[i]))
        self._x0s = [x0, *self._x0s][: self.config.solver_order]
        return x0

    def _update(self, order: int, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        """x_t = A sample + sum_k w_k x0_k (+ N noise) with step i's coefficients for ``order``."""
        A, N, W = self._coefficients[order]
        prev = float(A[i]) * sample
        for w, x0 in zip(W[i], self._x0s):
            prev = prev + float(w) * x0
        if self.stochastic:
            prev = prev + float(N[i]) * step_noise(noise, sample)
        return prev

class DPMSolverMultistepScheduler(DPMSolverBase):
    """DPM-Solver++ 2M / 3M (and their SDE forms) in MLX, step for step diffusers'.

    Multistep: each step reuses the x0 estimates of the previous one or two steps; the order ramps
    up from 1 as they become available (also when a run starts midway), and drops back to 1 on
    the last step.
    """

    config_class = DPMSolverMultistepConfig

    def __init__(self, config: DPMSolverMultistepConfig | None = None):
        super().__init__(config)
        self._lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: Any = None) -> None:
        super().set_timesteps(num_inference_steps, timesteps)
        self._lower_order_nums = 0

    def _spaced_timesteps(self, steps: int) -> np.ndarray:
        # Not Euler's spacing: "linspace" and "leading" place steps + 1 points and drop the last (0).
        c, last = self.config, last_timestep(self.config, self.alphas_cumprod_np)
        if c.timestep_spacing == "linspace":
            return linspace_timesteps(last, steps)
        if c.timestep_spacing == "leading":
            ratio = last // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + c.steps_offset
        ratio = c.num_train_timesteps / steps  # trailing
        return np.arange(last, 0, -ratio).round().astype(np.int64) - 1

    def _tables(self, alpha, sigma, lam):
        """Step i goes from sigma[i] to sigma[i + 1]; its x0 estimates are those of steps i, i-1, i-2.

        With h = lambda_{i+1} - lambda_i and r0, r1 the two previous increments over h, diffusers
        forms D1_0 = (x0_i - x0_{i-1}) / r0, the second order's D1; at third order also D1_1 =
        (x0_{i-1} - x0_{i-2}) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1) and D2 = (D1_0 -
        D1_1) / (r0 + r1).
        """
        lam_s = lam[:-1]
        h = lam[1:] - lam_s
        t = solver_terms(self.config.algorithm_type, alpha[1:], sigma[1:], sigma[:-1], h)
        tables = {1: (t.A, t.N, folded(t.c0))}
        if self.config.solver_order == 1:
            return tables
        r0 = (lam_s - back(lam_s, 1)) / h
        k0 = np.float32(1.0) / r0
        c1 = (t.c_mid if self.config.solver_type == "midpoint" else t.c_lin).astype(np.float64)
        tables[2] = (t.A, t.N, folded(t.c0 + c1 * k0, -c1 * k0))
        if self.config.solver_order == 3:
            r1 = (back(lam_s, 1) - back(lam_s, 2)) / h
            k1 = np.float32(1.0) / r1
            q, p = r0 / (r0 + r1), np.float32(1.0) / (r0 + r1)
            lin, quad = t.c_lin.astype(np.float64), t.c_quad.astype(np.float64)
            u = lin * (1 + q) + quad * p  # coefficient of D1_0
            v = -(lin * q + quad * p)  # coefficient of D1_1
            tables[3] = (t.A, t.N, folded(t.c0 + u * k0, -u * k0 + v * k1, -v * k1))
        return tables

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        """One DPM-Solver++ step; ``noise`` is used by the SDE form only.

        ``pred_original_sample`` is the x0 estimate the solver used (diffusers does not return it).
        """
        i = self._current_index(timestep)
        sample = sample.astype(mx.float32)
        x0 = self._x0(model_output.astype(mx.float32), sample, i)
        n, c = len(self._timesteps_np), self.config
        # diffusers' rule: the order grows with the estimates seen since the (re)start; the last
        # step is first order (final sigma 0); with lower_order_final and fewer than 15 steps the
        # one before it is at most second order.
        order = min(c.solver_order, self._lower_order_nums + 1)
        if i == n - 1:
            order = 1
        elif i == n - 2 and c.lower_order_final and n < 15:
            order = min(order, 2)
        prev = self._update(order, i, sample, noise)
        self._lower_order_nums = min(self._lower_order_nums + 1, c.solver_order)
        self._step_index = i + 1
        return StepOutput(prev.astype(model_output.dtype), x0)
