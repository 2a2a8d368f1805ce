"""Trajectory Consistency Distillation sampler (diffusers' ``TCDScheduler``, for TCD-SDXL-LoRA).

Each step predicts x0 and the noise, re-noises them deterministically to an intermediate timestep
s = floor((1 - eta) * t_next) (DDIM-style), then, for eta > 0, moves from s to t_next by fresh
forward noise. eta = 0 is deterministic (s = t_next); eta = 1 goes through s = 0 (re-noising
x0 completely, like LCM). The schedule is LCM's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import InputError
from .base import StepOutput, parse_config, step_noise
from .lcm import ConsistencyConfig, ConsistencyScheduler

# diffusers' default of TCDScheduler.step(eta=...), and the value the TCD-SDXL-LoRA card uses.
# (diffusers' SD / SDXL pipelines pass their own eta argument, which defaults to 0.)
DEFAULT_ETA = 0.3


@dataclass(frozen=True)
class TCDConfig(ConsistencyConfig):
    """diffusers' ``TCDScheduler`` fields and defaults (the same as ``LCMScheduler``'s).

    Implemented: epsilon / v_prediction. TCD's step reads none of ``clip_sample``,
    ``clip_sample_range``, ``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value``
    and ``timestep_scaling``, so they take any value (a config written for LCM loads unchanged).
    ``eta`` is not a field: in diffusers it is an argument of ``step``; here it is the
    scheduler's (see ``TCDScheduler``).
    """


class TCDScheduler(ConsistencyScheduler):
    """TCD sampling in MLX, step for step diffusers' ``TCDScheduler``.

    ``eta`` (the paper's gamma, in [0, 1]) is what diffusers takes as ``step(eta=...)``; here it
    is an attribute of the scheduler, set by ``TCDScheduler(config, eta=...)`` or
    ``TCDScheduler.from_config(source, eta=..., **config_overrides)``, or assigned later. It is
    kept apart from the config so that a scheduler_config.json never carries it (a config with an
    "eta" key is refused like any unknown key). With eta > 0 the sampler is ``stochastic``: every
    step but the last adds noise, the given ``noise`` or an ``mx.random`` draw.

    ``pred_original_sample`` is the model's x0 estimate (diffusers returns the re-noised
    ``pred_noised_sample`` instead, which equals ``prev_sample`` on deterministic steps).
    """

    config_class = TCDConfig

    def __init__(self, config: TCDConfig | None = None, eta: float = DEFAULT_ETA):
        super().__init__(config)
        self.eta = eta

    @classmethod
    def from_config(cls, config: Any = None, *, eta: float = DEFAULT_ETA, **overrides: Any) -> "TCDScheduler":
        """As ``Scheduler.from_config``; ``eta`` is the sampler's, every other keyword a config field."""
        return cls(parse_config(cls.config_class, {} if config is None else config, overrides), eta=eta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}, eta={self.eta})"

    @property
    def eta(self) -> float:
        return self._eta

    @eta.setter
    def eta(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise InputError(f"TCD's eta (gamma) must be a number in [0, 1], got {value!r}.")
        self._eta = float(value)

    @property
    def stochastic(self) -> bool:
        return self._eta > 0

    def intermediate_timestep(self, t_next: int) -> int:
        """s = floor((1 - eta) t_next), in float32: diffusers multiplies an integer timestep
        tensor by a Python float, which torch computes in float32. It matters: for eta = 0.3 and
        t_next = 90, float64 gives 62.99999... (s = 62) and float32 63.0 (s = 63)."""
        return int(np.floor(np.float32(1.0 - self._eta) * np.float32(t_next)))

    def step(
        self, model_output: mx.array, timestep: Any, sample: mx.array, noise: mx.array | None = None
    ) -> StepOutput:
        i, t, last, following = self._begin_step(timestep)
        # After the last scheduled timestep diffusers steps towards timestep 0.
        t_next = 0 if following is None else following
        acp = self.alphas_cumprod_np
        a_s = acp[self.intermediate_timestep(t_next)]
        out_dtype = model_output.dtype
        sample = sample.astype(mx.float32)
        x0, eps = self._x0_and_eps(model_output.astype(mx.float32), sample, acp[t])
        noised = float(np.sqrt(a_s)) * x0 + float(np.sqrt(np.float32(1.0) - a_s)) * eps
        if self._eta > 0 and not last:
            # Forward noise from s to t_next: a_next / a_s is the alpha product between them.
            ratio = acp[t_next] / a_s
            prev = float(np.sqrt(ratio)) * noised + float(np.sqrt(np.float32(1.0) - ratio)) * step_noise(
                noise, model_output
            )
        else:
            prev = noised
        self._step_index = i + 1
        return StepOutput(prev.astype(out_dtype), x0)
