"""Pseudo numerical methods sampler (diffusers' ``PNDMScheduler``; SD 1.x / 2.x ship it).

Every move uses the PNDM transfer (Liu et al. 2022, eq. 9), a DDIM step written for a noise
estimate e: x_prev = sqrt(a_prev / a_t) x - (a_prev - a_t) e / (a_t sqrt(1 - a_prev)
+ sqrt(a_t (1 - a_t) a_prev)). What varies is e:

* PLMS (``skip_prk_steps=True``, what SD ships): a linear multistep combination of the last up to
  four model outputs (Adams-Bashforth). It warms up with a Heun-like pair: the first step's
  output is used for a first move, then the step is redone from the same sample with the mean of
  that output and the next one. That redo is why the second timestep appears twice.
* PRK (``skip_prk_steps=False``): three classical Runge-Kutta steps (four model evaluations each)
  produce the first outputs, then PLMS carries on.

Like diffusers, the sampler is driven by a call counter, not by a step index: each ``step``
reads the timestep it is given, and a run must start with a fresh ``set_timesteps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import InputError
from .base import (
    BetaScheduleConfig,
    Scheduler,
    StepOutput,
    check_steps,
    spaced_timesteps,
    table_index,
    vp_add_noise,
)

RK_STEPS = 3  # Runge-Kutta steps of the PRK warm-up: enough model outputs for 4th-order PLMS


@dataclass(frozen=True)
class PNDMConfig(BetaScheduleConfig):
    """diffusers' ``PNDMScheduler`` fields and defaults.

    Implemented: PLMS and PRK, set_alpha_to_one, steps_offset, the three spacings, epsilon /
    v_prediction. diffusers' class takes no ``rescale_betas_zero_snr``: its ``from_config``
    drops that key unread, so any value is accepted here and stored as False.
    """

    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    timestep_spacing: str = "leading"

    def _validate(self) -> None:
        object.__setattr__(self, "rescale_betas_zero_snr", False)
        super()._validate()
        self._flag("skip_prk_steps")
        self._flag("set_alpha_to_one")


class PNDMScheduler(Scheduler):
    """PNDM (PLMS or PRK) in MLX, step for step diffusers' ``PNDMScheduler``.

    ``timesteps`` are integers (int32 here, int64 in diffusers). Each move goes from the given
    timestep down by ``num_train_timesteps // num_inference_steps``, whatever the spacing (as
    diffusers; with "leading" that is the next scheduled timestep). ``set_begin_index`` is
    accepted for a uniform interface and changes nothing: diffusers' PNDM has none, so its img2img
    starts the counter afresh at the first timestep it runs. The sampler is deterministic;
    ``step`` returns no ``pred_original_sample`` (diffusers computes none).
    """

    config_class = PNDMConfig
    init_noise_sigma = 1.0

    def __init__(self, config: PNDMConfig | None = None):
        super().__init__(config)
        acp = self.alphas_cumprod_np
        # The "previous" cumulative alpha below timestep 0: 1 (fully denoised) or the table's first.
        self._final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else acp[0]
        self._prk_timesteps = np.zeros(0, dtype=np.int64)
        self._reset_state()

    def _reset_state(self) -> None:
        self._counter = 0
        self._outputs: list[mx.array] = []  # the model outputs PLMS combines, oldest first
        self._cur_sample: mx.array | None = None  # the sample a warm-up step starts from
        self._rk_sum: mx.array | None = None  # the running Runge-Kutta combination

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps)
        c = self.config
        if num_inference_steps > c.num_train_timesteps:
            raise InputError(
                f"num_inference_steps = {num_inference_steps} exceeds num_train_timesteps = {c.num_train_timesteps}."
            )
        if not c.skip_prk_steps and num_inference_steps < RK_STEPS + 1:
            # diffusers fails on a shape mismatch here: the warm-up needs four spaced timesteps.
            raise InputError(f"PNDM with skip_prk_steps=False needs at least {RK_STEPS + 1} steps, "
                             f"got {num_inference_steps}.")
        self.num_inference_steps = num_inference_steps
        spaced = spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset)
        spaced = spaced.round().astype(np.int64)  # descending
        if c.skip_prk_steps:
            # PLMS: the second timestep twice (the warm-up's move and its redo).
            self._prk_timesteps = np.zeros(0, dtype=np.int64)
            plms = np.concatenate([spaced[:2], spaced[1:]])
        else:
            # Each Runge-Kutta step from hi to lo evaluates the model at hi, twice at the midpoint
            # lo + h and at lo, with h = half diffusers' step size (not of the spaced gap).
            h = c.num_train_timesteps // num_inference_steps // 2
            top = spaced[: RK_STEPS + 1]
            self._prk_timesteps = np.concatenate([[hi, lo + h, lo + h, lo] for hi, lo in zip(top[:-1], top[1:])])
            plms = spaced[RK_STEPS:]  # from the warm-up's last timestep on
        self._timesteps_np = np.concatenate([self._prk_timesteps, plms]).astype(np.int64)
        self.timesteps = mx.array(self._timesteps_np.astype(np.int32))
        self._reset_index()
        self._reset_state()

    def scale_model_input(self, sample: mx.array, timestep: Any = None) -> mx.array:
        """Identity: PNDM works on unscaled samples."""
        return sample

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        """One PNDM step; ``noise`` is unused (the sampler is deterministic)."""
        if self.num_inference_steps is None:
            raise InputError("PNDMScheduler: call set_timesteps(num_inference_steps) first.")
        t = table_index(timestep, self.config.num_train_timesteps, negative=True)
        out_dtype = model_output.dtype
        model_output = model_output.astype(mx.float32)
        sample = sample.astype(mx.float32)
        if self._counter < len(self._prk_timesteps):
            prev = self._step_prk(model_output, t, sample)
        else:
            prev = self._step_plms(model_output, t, sample)
        self._counter += 1
        return StepOutput(prev.astype(out_dtype))

    def _step_prk(self, model_output: mx.array, t: int, sample: mx.array) -> mx.array:
        """Stage ``counter % 4`` of a Runge-Kutta step; every stage moves from the step's start.

        As diffusers: the stage's target is the given timestep less a half step (even stages) or
        the given timestep itself (odd ones); the stage's own timestep is the step's first.
        """
        c, stage = self._counter, self._counter % 4
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        target = t - (0 if c % 2 else half)
        start = int(self._prk_timesteps[c - stage])
        if stage == 0:
            self._rk_sum = (1 / 6) * model_output
            self._outputs.append(model_output)  # the step's first output seeds PLMS
            self._cur_sample = sample
        elif stage in (1, 2):
            self._rk_sum = self._rk_sum + (1 / 3) * model_output
        else:  # the RK4 mean k1/6 + k2/3 + k3/3 + k4/6, summed in that order as diffusers does
            model_output = self._rk_sum + (1 / 6) * model_output
            self._rk_sum = None
        return self._transfer(self._cur_sample, start, target, model_output)

    def _step_plms(self, model_output: mx.array, t: int, sample: mx.array) -> mx.array:
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        target = t - ratio
        if self._counter == 1:
            # The warm-up's redo: the move from the previous timestep again, from its sample, with
            # the mean of both outputs; this output is not kept for later steps.
            target, t = t, t + ratio
            eps = (model_output + self._outputs[-1]) / 2
            sample, self._cur_sample = self._cur_sample, None
        else:
            self._outputs = self._outputs[-3:] + [model_output]
            e = self._outputs[::-1]  # newest first
            if len(e) == 1:
                eps = model_output
                self._cur_sample = sample
            elif len(e) == 2:
                eps = (3 * e[0] - e[1]) / 2
            elif len(e) == 3:
                eps = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            else:
                eps = (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])
        return self._transfer(sample, t, target, eps)

    def _transfer(self, sample: mx.array, t: int, target: int, model_output: mx.array) -> mx.array:
        """PNDM's eq. 9 from timestep t to ``target`` (below 0: the final alpha), float32 scalars."""
        acp = self.alphas_cumprod_np
        a_t = acp[t]
        a_prev = acp[target] if target >= 0 else self._final_alpha_cumprod
        b_t, b_prev = np.float32(1.0) - a_t, np.float32(1.0) - a_prev
        if self.config.prediction_type == "v_prediction":  # the noise estimate, from v and this sample
            model_output = float(np.sqrt(a_t)) * model_output + float(np.sqrt(b_t)) * sample
        sample_coeff = np.sqrt(a_prev / a_t)
        denominator = a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)
        return float(sample_coeff) * sample - (float(a_prev - a_t) * model_output) / float(denominator)

    def add_noise(self, original_samples: mx.array, noise: mx.array, timesteps: Any) -> mx.array:
        """sqrt(a_t) x + sqrt(1 - a_t) noise, indexed by the timesteps themselves (img2img)."""
        return vp_add_noise(self.alphas_cumprod_np, original_samples, noise, timesteps, negative=True)
