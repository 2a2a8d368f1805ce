"""Samplers for the UNet, in MLX, step for step diffusers' schedulers.

Pick one by name with ``make_scheduler`` and a model's ``scheduler_config.json`` (any diffusers
scheduler's config describes the noise schedule; the name picks the solver), or build a class
directly with ``from_config``. Every sampler has the same interface::

    sched.set_timesteps(num_inference_steps)
    sched.set_begin_index(i)                      # optional: start midway (img2img, refiner)
    latents = noise * sched.init_noise_sigma      # or sched.add_noise(image_latents, noise, t) for img2img
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(latents, t), t, ...)
        latents = sched.step(eps, t, latents).prev_sample
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..errors import InputError
from .base import (
    KNOWN_SCHEDULER_KEYS,
    Scheduler,
    StepOutput,
    read_config,
    sigma_table,
)
from .ddim import DDIMConfig, DDIMScheduler
from .deis import DEISMultistepConfig, DEISMultistepScheduler
from .dpm_singlestep import DPMSolverSinglestepConfig, DPMSolverSinglestepScheduler
from .dpm_solver import DPMSolverMultistepConfig, DPMSolverMultistepScheduler
from .euler import EulerDiscreteConfig, EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteConfig, HeunDiscreteScheduler
from .lcm import LCMConfig, LCMScheduler
from .lms import LMSDiscreteConfig, LMSDiscreteScheduler
from .names import WEB_UI_SAMPLERS, sampler_name, sigma_schedule_name
from .pndm import PNDMConfig, PNDMScheduler
from .sigmas import SIGMA_FLAGS, SIGMA_SCHEDULES, ays_timesteps
from .tcd import TCDConfig, TCDScheduler
from .unipc import UniPCMultistepConfig, UniPCMultistepScheduler

_DPM = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint"}
# Sampler name -> (class, the config values the name stands for). A config file describes the
# model's noise schedule (betas, prediction type, spacing); the solver settings come from the name,
# as "DPM++ 2M SDE" means the same thing whichever scheduler wrote the model's config.
SAMPLERS: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**_DPM, "solver_order": 2}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {**_DPM, "algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": (DPMSolverMultistepScheduler, {**_DPM, "solver_order": 3}),
    "dpmpp_3m_sde": (DPMSolverMultistepScheduler, {**_DPM, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_2s": (DPMSolverSinglestepScheduler, {**_DPM, "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}
assert tuple(SAMPLERS) == tuple(WEB_UI_SAMPLERS)  # one list of names


# A shipped config's ``_class_name`` -> our sampler (DPM-Solver's depends on its settings too).
_SAMPLER_OF_CLASS = {cls.__name__: name for name, (cls, implied) in SAMPLERS.items() if not implied}
_SAMPLER_OF_CLASS["DPMSolverSinglestepScheduler"] = "dpmpp_2s"


# Config keys that set up a class's solver, not the model's noise schedule.
_SOLVER_KEYS = ("algorithm_type", "solver_type", "solver_order", "lower_order_final", "euler_at_final")


def shipped_sampler(config: dict[str, Any] | None) -> str:
    """The sampler a diffusers scheduler config was written by (Euler for a class we lack, or no
    config: what SDXL ships)."""
    config = config or {}
    cls = config.get("_class_name")
    if cls == "DPMSolverMultistepScheduler":
        sde = config.get("algorithm_type") == "sde-dpmsolver++"
        return f"dpmpp_{3 if config.get('solver_order') == 3 else 2}m{'_sde' if sde else ''}"
    return _SAMPLER_OF_CLASS.get(cls, "euler")


def sigma_schedules(sampler: str) -> tuple[str, ...]:
    """The sigma schedules ``sampler`` can run on: the re-spacings its diffusers class has config
    flags for, and Align-Your-Steps where it takes custom timesteps."""
    cls = SAMPLERS[sampler][0]
    names = {f.name for f in fields(cls.config_class)}
    return ("default", *(kind for kind, flag in SIGMA_FLAGS.items() if flag in names),
            *(("ays",) if cls.takes_timesteps else ()))


def make_scheduler(name: str, config: Any = None, *, sigmas: str | None = None, family: str | None = None,
                   **overrides: Any) -> Scheduler:
    """A sampler by name: ours ("dpmpp_2m"), the web UI's ("DPM++ 2M Karras") or ComfyUI's.

    ``config``: a diffusers scheduler config (dict), a ``scheduler_config.json`` or a folder
    holding one (or a pipeline folder with ``scheduler/``), or None for diffusers' defaults.
    ``sigmas``: one of ``SIGMA_SCHEDULES``, or None for what the name or the config says;
    "default" runs the config's timestep spacing un-respaced, "ays" Align-Your-Steps for
    ``family`` ("sd" or "sdxl"). ``overrides`` replace config fields; one that contradicts the
    name is refused.
    """
    sampler, named_sigmas = sampler_name(name)
    if sigmas is not None:
        sigmas = sigma_schedule_name(sigmas)
        if named_sigmas not in (None, sigmas):
            raise InputError(f"sampler {name!r} means the {named_sigmas} sigma schedule; got sigmas={sigmas!r}.")
    sigmas = sigmas or named_sigmas
    cls, implied = SAMPLERS[sampler]
    for key, value in overrides.items():
        if key in implied and value != implied[key]:
            raise InputError(f"sampler {name!r} means {key}={implied[key]!r}; got {key}={value!r}.")
    if sigmas is not None:
        if sigmas not in sigma_schedules(sampler):
            takes = ", ".join(sigma_schedules(sampler)[1:]) or "none but its own spacing (default)"
            raise InputError(f"the {sampler} sampler cannot run on the {sigmas} sigma schedule; it takes {takes}.")
        # One re-spacing at most: the chosen one on, the others (a shipped config's) off.
        implied = {**implied, **{flag: kind == sigmas for kind, flag in SIGMA_FLAGS.items()}}
    config = {} if config is None else read_config(config)
    if config.get("_class_name", cls.__name__) != cls.__name__:
        # Another class's solver settings ("sde-dpmsolver++" given to DEIS, a singlestep solver's
        # lower_order_final to UniPC): the name chose the solver, which runs on its own defaults.
        for key in _SOLVER_KEYS:
            config.pop(key, None)
    scheduler = cls.from_config(config, **{**implied, **overrides})
    if sigmas == "ays":
        if family is None:
            raise InputError("the Align-Your-Steps sigma schedule needs the model family (sd or sdxl).")
        table = sigma_table(scheduler.alphas_cumprod_np)
        scheduler.custom_timesteps = lambda steps: ays_timesteps(family, steps, table)
    return scheduler


# The noise schedule of stabilityai/stable-diffusion-xl-base-1.0 (scheduler/scheduler_config.json);
# SD 1.x/2.x use the same betas. For when a converted UNet comes without its pipeline's config.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "use_karras_sigmas": False,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "sample_max_value": 1.0,
    "skip_prk_steps": True,
    "trained_betas": None,
}


__all__ = [
    "DDIMConfig",
    "DDIMScheduler",
    "DEISMultistepConfig",
    "DEISMultistepScheduler",
    "DPMSolverMultistepConfig",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepConfig",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteConfig",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteConfig",
    "EulerDiscreteScheduler",
    "HeunDiscreteConfig",
    "HeunDiscreteScheduler",
    "InputError",
    "KNOWN_SCHEDULER_KEYS",
    "LCMConfig",
    "LCMScheduler",
    "LMSDiscreteConfig",
    "LMSDiscreteScheduler",
    "PNDMConfig",
    "PNDMScheduler",
    "SAMPLERS",
    "SDXL_SCHEDULER_CONFIG",
    "SIGMA_SCHEDULES",
    "Scheduler",
    "StepOutput",
    "TCDConfig",
    "TCDScheduler",
    "UniPCMultistepConfig",
    "UniPCMultistepScheduler",
    "make_scheduler",
    "read_config",
    "shipped_sampler",
    "sigma_schedules",
]
