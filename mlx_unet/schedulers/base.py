"""What every sampler shares: config parsing, the training noise table, step-index bookkeeping.

Each sampler is a diffusers scheduler re-derived in MLX. The schedule tables (betas, cumulative
alphas, sigmas, timesteps) are computed once per ``set_timesteps`` in numpy, in the precision and
order of operations diffusers uses, so that ``timesteps`` and ``sigmas`` agree with diffusers' to
a float32 rounding. ``step()`` then only looks a few precomputed float32 scalars up by step index
and issues a handful of elementwise MLX ops: no per-element Python work, nothing copied to the
host but the current timestep.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import mlx.core as mx
import numpy as np

from ..configs.base import check_choice, check_flag, check_int, check_number, config_fields, named, read_config_json
from ..errors import ConfigError, InputError

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


class StepOutput(NamedTuple):
    """What ``step`` returns; unpacks as a tuple too, like diffusers' ``return_dict=False``."""

    prev_sample: mx.array
    pred_original_sample: mx.array | None = None


# Config keys that diffusers' schedulers of the SD / SDXL families write (the KarrasDiffusionSchedulers
# set, plus LCM and TCD, whose configs ship with SDXL distillations). A pipeline's
# scheduler_config.json is written by one of those classes, and loading it into another class is
# how samplers are switched, in diffusers as here. A key that the *receiving* class does not take
# is dropped by diffusers' ``from_config`` without being read, so it cannot change that class's
# math: such keys are accepted and ignored. A key outside this list is refused, because it may
# belong to a newer diffusers feature we would otherwise run without.
KNOWN_SCHEDULER_KEYS = frozenset({
    # every class
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
    # DDIM / DDPM / PNDM / LCM / TCD / Heun
    "clip_sample", "clip_sample_range", "set_alpha_to_one", "skip_prk_steps", "variance_type",
    "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
    "original_inference_steps", "timestep_scaling",
    # Euler / LMS / Heun / KDPM2 / EDM
    "interpolation_type", "timestep_type", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "sigma_min", "sigma_max", "final_sigmas_type", "sigma_data",
    "sigma_schedule", "rho",
    # DPM-Solver / DEIS / UniPC
    "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
    "use_lu_lambdas", "use_flow_sigmas", "flow_shift", "lambda_min_clipped",
    "use_dynamic_shifting", "time_shift_type", "predict_x0", "solver_p", "disable_corrector",
    "shift_terminal",
})


# ---------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class BetaScheduleConfig:
    """The fields every sampler shares: the training noise schedule and how it is subsampled.

    Field names and defaults are diffusers'. Subclasses add their own fields and check the whole
    in ``_validate``, so a config object that exists is one we can run exactly.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        # The class name tells which sampler refused: the fields are shared between them.
        with named(type(self).__name__):
            self._validate()

    def _flag(self, name: str, supported: tuple[bool, ...] = (False, True)) -> None:
        """Check boolean field ``name`` and store it as a bool (diffusers reads null as false)."""
        object.__setattr__(self, name, check_flag(name, getattr(self, name), supported))

    def _validate(self) -> None:
        check_int("num_train_timesteps", self.num_train_timesteps)
        check_number("beta_start", self.beta_start)
        check_number("beta_end", self.beta_end)
        if self.trained_betas is not None:
            betas = self.trained_betas
            if not isinstance(betas, (list, tuple, np.ndarray)) or len(betas) != self.num_train_timesteps:
                raise ConfigError(
                    f"config field 'trained_betas' must list num_train_timesteps = {self.num_train_timesteps} betas."
                )
            # Frozen dataclasses should hold immutable values; a tuple also keeps the config hashable.
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        else:
            # squaredcos_cap_v2 (cosine) is not implemented; the SD/SDXL families all train on the others.
            check_choice("beta_schedule", self.beta_schedule, ("scaled_linear", "linear"))
        # "sample" prediction is for pixel-space models, not the SD/SDXL families.
        check_choice("prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        check_choice("timestep_spacing", self.timestep_spacing, ("leading", "trailing", "linspace"))
        check_int("steps_offset", self.steps_offset, 0)
        # Zero-terminal-SNR rescaling changes the table and the last timestep's handling.
        self._flag("rescale_betas_zero_snr", (False,))


def read_config(source: Any) -> dict[str, Any]:
    """A config as a plain dict, from a dict, a config dataclass, a JSON file, or a folder.

    A folder is read as diffusers does with ``from_pretrained``: its ``scheduler_config.json``;
    a whole pipeline folder works too (its ``scheduler/`` subfolder).
    """
    if is_dataclass(source) and not isinstance(source, type):
        return asdict(source)
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"a scheduler config must be a dict, a JSON file or a folder, got {type(source).__name__}."
        )
    path = Path(source)
    if path.is_dir():
        for candidate in (path / SCHEDULER_CONFIG_NAME, path / "scheduler" / SCHEDULER_CONFIG_NAME):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise ConfigError(f"no {SCHEDULER_CONFIG_NAME} in {source} (nor in its scheduler/ folder).")
    return read_config_json(path, "scheduler", SCHEDULER_CONFIG_NAME)


def parse_config(config_cls: type, source: Any, overrides: Mapping[str, Any]) -> Any:
    """Build ``config_cls`` from ``source`` with ``overrides`` on top.

    Which class wrote the config does not matter, as with diffusers' ``from_config``: the keys of
    the other schedulers are accepted and read past.
    """
    defaults = {f.name: f.default for f in fields(config_cls)}
    given = {**read_config(source), **overrides}  # outside named(): a bad file's error starts with its path
    with named(config_cls.__name__):
        kwargs = config_fields(given, defaults, "diffusers scheduler", accepted=KNOWN_SCHEDULER_KEYS)
    return config_cls(**kwargs)


# ---------------------------------------------------------------------------------- tables


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit (CPU).

    torch steps in float32 from ``start`` over the first half and back from ``end`` over the
    second, each point one fused multiply-add (the compiler contracts ``start + step * i``);
    a float64 product is exact for float32 factors, so one float64 add rounds as the FMA does.
    """
    first, last = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([first])
    step = (last - first) / np.float32(steps - 1)
    i = np.arange(steps)
    up = np.float64(step) * i + np.float64(first)
    down = np.float64(last) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def rounded(fn: Any, x: np.ndarray) -> np.ndarray:
    """``fn`` (np.log, np.exp, np.expm1) of float32 ``x``, correctly rounded to float32.

    torch's float32 log / exp / expm1 (SLEEF, within an ulp) agree with the correctly rounded
    value on ~99% of inputs, numpy's float32 loops on ~60%; the multistep solvers magnify an
    ulp where steps are close in log-SNR (their coefficients cancel most of their digits).
    """
    return fn(np.asarray(x, np.float64)).astype(np.float32)


def alphas_cumprod(config: BetaScheduleConfig) -> np.ndarray:
    """The training schedule's cumulative alpha product, float32, bit for bit as diffusers builds it.

    diffusers makes float32 betas with ``torch.linspace`` (reproduced by ``torch_linspace``; a
    float64 linspace rounded is an ulp off in most entries, which the order-3 solvers magnify)
    and takes ``torch.cumprod`` of the float32 alphas, which on the CPU accumulates in float64
    and rounds each partial product to float32.
    """
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = torch_linspace(config.beta_start, config.beta_end, config.num_train_timesteps)
    else:  # scaled_linear: linear in sqrt(beta), squared in float32 as diffusers does
        roots = torch_linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps)
        betas = roots * roots
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def sigma_table(alphas_cumprod_: np.ndarray) -> np.ndarray:
    """Training sigmas sqrt((1 - a) / a), float32, index = training timestep (ascending)."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod_) / alphas_cumprod_)


def spaced_timesteps(spacing: str, num_train: int, steps: int, steps_offset: int) -> np.ndarray:
    """Descending inference timesteps (float64) as Euler and DDIM space them.

    "linspace" is left unrounded (Euler keeps fractional timesteps; DDIM rounds). "trailing"
    keeps diffusers' float ``arange``, which for some step counts (61, 103, ...) yields one extra
    timestep, -1; reproduced rather than fixed, so that schedules stay identical.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + steps_offset
    ratio = num_train / steps  # trailing
    return np.arange(num_train, 0, -ratio).round() - 1


def sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose sigma is ``sigmas``, by linear interpolation in log sigma.

    ``log_table`` is the float32 log of the ascending sigma table. As diffusers: the bracketing pair
    is the last table entry <= log sigma (clamped to the table), and the weight is clipped to [0, 1].
    """
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(log_table) - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


# ---------------------------------------------------------------------------------- runtime


def check_steps(num_inference_steps: Any) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")


def as_scalar(value: Any) -> float | int:
    """A timestep (Python number, numpy scalar, or one-element mx.array) as a Python number."""
    if isinstance(value, (mx.array, np.ndarray, np.generic)):
        if value.size != 1:
            raise InputError(f"expected one timestep, got an array of shape {tuple(value.shape)}.")
        return value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"a timestep must be a number or a one-element array, got {type(value).__name__}.")
    return value


def timestep_list(timesteps: Any) -> np.ndarray:
    """``add_noise``'s timesteps (scalar, list, numpy or mx array) as a flat numpy array."""
    return np.asarray(np.array(timesteps) if isinstance(timesteps, mx.array) else timesteps).reshape(-1)


def per_item(values: np.ndarray, like: mx.array) -> mx.array:
    """One value per batch item, shaped to broadcast over the rest of ``like`` (NHWC or NCHW)."""
    return mx.array(values.astype(np.float32)).reshape((-1,) + (1,) * (like.ndim - 1)).astype(like.dtype)


def table_index(timestep: Any, num_train: int, negative: bool = False) -> int:
    """An integer timestep as an index of the training table.

    ``negative``: accept -num_train..-1 as counting from the end, as torch indexing does in
    diffusers (a "trailing" PNDM schedule can hold -1); else only 0..num_train-1.
    """
    t = as_scalar(timestep)
    if t != int(t):
        raise InputError(f"these samplers take integer timesteps, got {t!r}.")
    t = int(t)
    if not (-num_train if negative else 0) <= t < num_train:
        raise InputError(f"timestep {t} is outside the {num_train} training timesteps.")
    return t


def vp_add_noise(alphas_cumprod_: np.ndarray, original: mx.array, noise: mx.array, timesteps: Any,
                 negative: bool = False) -> mx.array:
    """sqrt(a_t) x + sqrt(1 - a_t) noise, a_t looked up by the timesteps themselves (one per item)."""
    ts = [table_index(t, len(alphas_cumprod_), negative) for t in timestep_list(timesteps)]
    a = alphas_cumprod_[ts]
    return per_item(np.sqrt(a), original) * original + per_item(np.sqrt(np.float32(1.0) - a), original) * noise


def step_noise(noise: mx.array | None, like: mx.array) -> mx.array:
    """The caller's standard normal noise (float32), or a fresh draw of ``like``'s shape."""
    if noise is None:
        return mx.random.normal(like.shape)
    if tuple(noise.shape) != tuple(like.shape):
        raise InputError(f"noise has shape {tuple(noise.shape)}, the model output {tuple(like.shape)}.")
    return noise.astype(mx.float32)


class Scheduler:
    """Config loading and diffusers' step-index bookkeeping.

    diffusers' samplers do not trust the timestep passed to ``step`` beyond the first call: the
    first call (to ``scale_model_input`` or ``step``) fixes ``step_index``, either from
    ``begin_index`` when a pipeline set one (img2img, refiner hand-off) or by finding the timestep
    in the schedule, and every ``step`` then advances it by one. Reproducing this exactly matters
    when a schedule holds a timestep twice (Karras schedules can), and when a loop starts midway.
    """

    config_class: type = BetaScheduleConfig
    order = 1  # what diffusers reports for all four samplers (DPMSolverMultistep included)
    # Whether step() consumes noise: a loop that seeds per step passes it only to those that do.
    stochastic = False
    # Timesteps for a run of n steps, where they are not the config's spacing (Align-Your-Steps):
    # ``pipelines.schedule`` then calls ``set_timesteps(timesteps=custom_timesteps(n))``.
    custom_timesteps: Callable[[int], list[int]] | None = None
    takes_timesteps = False  # whether set_timesteps takes custom ``timesteps`` (as its diffusers class)

    def __init__(self, config: BetaScheduleConfig | None = None):
        if config is None:
            config = self.config_class()
        elif not isinstance(config, self.config_class):
            raise InputError(
                f"{type(self).__name__} takes a {self.config_class.__name__}; "
                f"use {type(self).__name__}.from_config(...) for a dict or a scheduler_config.json."
            )
        self.config = config
        self.alphas_cumprod_np = alphas_cumprod(config)
        self.num_inference_steps: int | None = None
        self._timesteps_np = np.zeros(0)
        self.timesteps = mx.array([])
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def from_config(cls, config: Any = None, **overrides: Any) -> "Scheduler":
        """From a diffusers config dict, a ``scheduler_config.json`` (or its folder), or a config object."""
        return cls(parse_config(cls.config_class, {} if config is None else config, overrides))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @property
    def alphas_cumprod(self) -> mx.array:
        return mx.array(self.alphas_cumprod_np)

    # ----------------------------------------------------------------- step index

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at this index of ``timesteps`` (call after ``set_timesteps``, which clears it)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
            raise InputError(f"begin_index must be a non-negative integer, got {begin_index!r}.")
        if self.num_inference_steps is not None and begin_index >= len(self._timesteps_np):
            raise InputError(f"begin_index {begin_index} is past the {len(self._timesteps_np)} timesteps.")
        self._begin_index = begin_index

    def _missing_timestep(self, timestep: float) -> int:
        raise InputError(
            f"timestep {timestep!r} is not in this scheduler's timesteps; pass values from "
            "scheduler.timesteps, or call set_begin_index."
        )

    def index_for_timestep(self, timestep: Any, schedule_timesteps: Any = None) -> int:
        """Where ``timestep`` is in the schedule; if it occurs twice, the second occurrence.

        The second, as in diffusers: a schedule entered midway then does not skip a sigma.
        """
        schedule = self._timesteps_np if schedule_timesteps is None else np.asarray(schedule_timesteps)
        value = as_scalar(timestep)
        matches = np.flatnonzero(schedule == value)
        if len(matches) == 0:
            return self._missing_timestep(value)
        return int(matches[1] if len(matches) > 1 else matches[0])

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _current_index(self, timestep: Any) -> int:
        if self.num_inference_steps is None:
            raise InputError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) first.")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self._timesteps_np):
            raise InputError(
                f"{type(self).__name__}: step() called more times than there are timesteps "
                f"({len(self._timesteps_np)}); call set_timesteps again to restart."
            )
        return self._step_index

    def _reset_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def _add_noise_indices(self, timesteps: Any) -> list[int]:
        """diffusers' choice of sigma for ``add_noise``: by lookup, or the current / begin index."""
        ts = timestep_list(timesteps)
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in ts]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * len(ts)
