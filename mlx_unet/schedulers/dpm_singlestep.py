"""DPM-Solver++ single-step sampler (diffusers' ``DPMSolverSinglestepScheduler``): DPM++ 2S, 3S, 1S.

A k-th order single-step update spends k model evaluations on one solver step: from an anchor
sample it takes intermediate steps of rising order (1, 2, ...) along the schedule, each from the
same anchor, and the k-th lands at the step's end with an order-k formula built from the
intermediate x0 estimates. diffusers lays this out over its ordinary timesteps: every timestep is
one model call, and a per-step order list (1, 2, 1, 2, ... for 2S) says which intermediate the call
is. The formulas, the schedule and the coefficient tables are shared with dpm_solver.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import numpy as np

from .base import BetaScheduleConfig, StepOutput
from .dpm_solver import (
    DPMSolverBase,
    DPMSolverConfig,
    back,
    folded,
    last_timestep,
    linspace_timesteps,
    solver_terms,
)

# Fields every sampler config here has (BetaScheduleConfig) that diffusers' single-step class
# does not take: its from_config drops them unread, so a config's values cannot act.
_NOT_SINGLESTEP_FIELDS = ("timestep_spacing", "steps_offset", "rescale_betas_zero_snr")


@dataclass(frozen=True)
class DPMSolverSinglestepConfig(DPMSolverConfig):
    """diffusers' ``DPMSolverSinglestepScheduler`` fields (see ``DPMSolverConfig``), its defaults.

    ``lower_order_final`` (default false here) takes any boolean: diffusers' ``set_timesteps``
    switches it on, for good, whenever the final sigma is zero (the only one implemented), so the
    order list always ends in lower orders. ``timestep_spacing``, ``steps_offset`` and
    ``rescale_betas_zero_snr`` are not fields of that class: whatever a config says, the timesteps
    are spaced as "linspace" and the table is not rescaled, as in diffusers; they are reset to the
    neutral defaults rather than checked.
    """

    lower_order_final: bool = False

    def _validate(self) -> None:
        defaults = {f.name: f.default for f in fields(BetaScheduleConfig)}
        for name in _NOT_SINGLESTEP_FIELDS:
            object.__setattr__(self, name, defaults[name])
        super()._validate()


def order_list(solver_order: int, steps: int) -> list[int]:
    """The order of each step: 1, 2, ..., solver_order, 1, 2, ... and a first-order last step.

    This is diffusers' ``get_order_list`` with ``lower_order_final`` (which a zero final sigma
    forces): a trailing partial cycle ends the run, and the last step lands on sigma 0 at first
    order (so 2S over an even count ends 1, 1; 3S over a multiple of three ends 1, 2, 1).
    """
    orders = [1 + j % solver_order for j in range(steps)]
    orders[-1] = 1
    return orders


class DPMSolverSinglestepScheduler(DPMSolverBase):
    """DPM-Solver++ single-step (2S by default; 3S and 1S by ``solver_order``) in MLX.

    Same interface as the multistep sampler. A first-order step sets the anchor (the sample the
    next higher-order steps start from); a run started midway (img2img) lowers the order until
    enough x0 estimates exist, as diffusers does.
    """

    config_class = DPMSolverSinglestepConfig

    def __init__(self, config: DPMSolverSinglestepConfig | None = None):
        super().__init__(config)
        self._orders: list[int] = []
        self._anchor: mx.array | None = None

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: Any = None) -> None:
        super().set_timesteps(num_inference_steps, timesteps)
        self._orders = order_list(self.config.solver_order, self.num_inference_steps)
        self._anchor = None

    def _spaced_timesteps(self, steps: int) -> np.ndarray:
        # The class has one spacing: diffusers' DPM "linspace" (steps + 1 points, the 0 dropped).
        return linspace_timesteps(last_timestep(self.config, self.alphas_cumprod_np), steps)

    def _tables(self, alpha, sigma, lam):
        """An order-k step i goes from the anchor at sigma[i - k + 1] to sigma[i + 1].

        With h the log-SNR span from the anchor and r0, r1 the spans of steps i and i - 1 from
        the anchor over h, diffusers forms at second order D0 = x0_{i-1}, D1 = (x0_i - x0_{i-1}) /
        r0; at third order D0 = x0_{i-2}, D1_0 = (x0_{i-1} - x0_{i-2}) / r1, D1_1 = (x0_i -
        x0_{i-2}) / r0, and either uses D1_1 alone ("midpoint") or D1 = (r0 D1_0 - r1 D1_1) /
        (r0 - r1) with D2 = 2 (D1_1 - D1_0) / (r0 - r1) ("heun").
        """
        c, one = self.config, np.float32(1.0)
        lam_s, sigma_s = lam[:-1], sigma[:-1]
        tables = {}
        for order in range(1, c.solver_order + 1):
            lam_a = back(lam_s, order - 1)  # the anchor's log-SNR
            h = lam[1:] - lam_a
            t = solver_terms(c.algorithm_type, alpha[1:], sigma[1:], back(sigma_s, order - 1), h)
            c0, lin, quad = (x.astype(np.float64) for x in (t.c0, t.c_lin, t.c_quad))
            r0 = (lam_s - lam_a) / h
            if order == 1:
                weights = folded(t.c0)
            elif order == 2:
                c1 = (t.c_mid if c.solver_type == "midpoint" else t.c_lin).astype(np.float64)
                k = one / r0
                weights = folded(c1 * k, c0 - c1 * k)
            else:
                r1 = (back(lam_s, 1) - lam_a) / h
                k0, k1 = one / r1, one / r0  # of D1_0 and D1_1
                if c.solver_type == "midpoint":
                    u, v = np.zeros_like(lin), lin  # coefficients of D1_0 and D1_1
                else:
                    d = (r0 - r1).astype(np.float64)
                    u = lin * r0 / d - 2 * quad / d
                    v = -lin * r1 / d + 2 * quad / d
                weights = folded(v * k1, u * k0, c0 - u * k0 - v * k1)
            tables[order] = (t.A, t.N, weights)
        return tables

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        """One call of the single-step solver; ``noise`` is used by the SDE form only.

        ``pred_original_sample`` is this call's x0 estimate (diffusers does not return it).
        """
        i = self._current_index(timestep)
        sample = sample.astype(mx.float32)
        x0 = self._x0(model_output.astype(mx.float32), sample, i)
        # diffusers lowers the listed order while it lacks estimates (a run started midway).
        order = min(self._orders[i], len(self._x0s))
        if order == 1:
            self._anchor = sample
        prev = self._update(order, i, self._anchor, noise)
        self._step_index = i + 1
        return StepOutput(prev.astype(model_output.dtype), x0)
