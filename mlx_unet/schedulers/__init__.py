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

from typing import Any

from ..errors import InputError
from .base import (
    KNOWN_SCHEDULER_KEYS,
    Scheduler,
    StepOutput,
    read_config,
)
from .ddim import DDIMConfig, DDIMScheduler
from .dpm_solver import DPMSolverMultistepConfig, DPMSolverMultistepScheduler
from .euler import EulerDiscreteConfig, EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler

# Sampler name -> (class, the config values the name stands for). A config file describes the
# model's noise schedule (betas, prediction type, spacing); the solver settings come from the name,
# as "DPM++ 2M Karras" means the same thing whichever scheduler wrote the model's config.
SAMPLERS: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "use_karras_sigmas": True},
    ),
    "ddim": (DDIMScheduler, {}),
}


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


def make_scheduler(name: str, config: Any = None, **overrides: Any) -> Scheduler:
    """A sampler by name ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim").

    ``config``: a diffusers scheduler config (dict), a ``scheduler_config.json`` or a folder
    holding one (or a pipeline folder with ``scheduler/``), or None for diffusers' defaults.
    ``overrides`` replace config fields; one that contradicts the name (``use_karras_sigmas=True``
    for "dpmpp_2m") is refused.
    """
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    cls, implied = SAMPLERS[name]
    for key, value in overrides.items():
        if key in implied and overrides[key] != implied[key]:
            raise InputError(f"sampler {name!r} means {key}={implied[key]!r}; got {key}={value!r}.")
    return cls.from_config({} if config is None else config, **{**implied, **overrides})


__all__ = [
    "DDIMConfig",
    "DDIMScheduler",
    "DPMSolverMultistepConfig",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteConfig",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteConfig",
    "EulerDiscreteScheduler",
    "KNOWN_SCHEDULER_KEYS",
    "SAMPLERS",
    "SDXL_SCHEDULER_CONFIG",
    "Scheduler",
    "StepOutput",
    "make_scheduler",
    "read_config",
]
