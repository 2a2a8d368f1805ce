"""The numbers a run is asked for, checked before anything is loaded or allocated.

Each check names the argument as the Python API spells it, or as the command line does where it
passes the option (``flag``), and says what was wrong and what to give instead. The pipeline,
the sampler and ``mlx-unet generate`` all check through these, so a value is refused the same
way wherever it comes in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import InputError

# More steps than the 1000 timesteps SD models are trained on only repeat timesteps (diffusers'
# schedulers refuse them); the bound also keeps a typo (--steps 30000) from running for days.
MAX_STEPS = 1000
# Past ~30 guidance saturates every image; far past it float16 activations overflow to inf.
MAX_GUIDANCE = 100.0
SEED_LIMIT = 2**64  # MLX's random keys take an unsigned 64-bit seed
PIXELS_PER_LATENT = 8  # every SD / SDXL VAE


def _named(name: str, flag: str | None) -> str:
    return name if flag is None else flag


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None, flag: str | None = None) -> int:
    """An integer (not a bool, not a float) in [minimum, maximum]."""
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        span = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise InputError(f"{_named(name, flag)} must be an integer {span}, got {value!r}.")
    return int(value)


def check_real(name: str, value: Any, minimum: float, maximum: float, flag: str | None = None,
               open_below: bool = False) -> float:
    """A finite number in [minimum, maximum] (``open_below``: (minimum, maximum])."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > maximum or value < minimum or (open_below and value == minimum):
        span = f"above {minimum:g} and at most {maximum:g}" if open_below else f"from {minimum:g} to {maximum:g}"
        raise InputError(f"{_named(name, flag)} must be a finite number {span}, got {value!r}.")
    return float(value)


def check_seed(seed: Any, flag: str | None = None) -> int | None:
    if seed is None:
        return None
    ok = isinstance(seed, Integral) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT
    if not ok:
        raise InputError(f"{_named('seed', flag)} must be an integer from 0 to 2**64 - 1, got {seed!r}.")
    return int(seed)


def check_size(name: str, value: Any, flag: str | None = None) -> int | None:
    """A pixel size: None (the model's default) or a positive multiple of 8."""
    if value is None:
        return None
    ok = isinstance(value, Integral) and not isinstance(value, bool) and value > 0
    if not ok or value % PIXELS_PER_LATENT:
        raise InputError(f"{_named(name, flag)} must be a positive multiple of {PIXELS_PER_LATENT} pixels, got {value!r}.")
    return int(value)


def check_finite_array(name: str, value: mx.array | np.ndarray) -> None:
    """Arrays a user hands in (latents, images, embeddings) hold no NaN or inf: they would pass
    through every step and come out as a black image."""
    array = mx.array(value) if isinstance(value, np.ndarray) else value
    if mx.issubdtype(array.dtype, mx.floating) and not mx.all(mx.isfinite(array)).item():
        raise InputError(f"{name} holds NaN or infinite values; pass finite numbers.")


def strength_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` an img2img run at ``strength`` takes (diffusers' get_timesteps)."""
    return min(int(steps * strength), steps)


# diffusers' default strengths: img2img's, and inpainting's (which then starts from pure noise).
IMG2IMG_STRENGTH = 0.3
INPAINT_STRENGTH = 1.0


@dataclass(frozen=True)
class RunArguments:
    """The numbers of one text-to-image (or img2img, or base + refiner) run, checked.

    ``img2img`` and ``refined`` say whether ``strength`` and ``refiner_start`` are used; they
    are checked only then, with the step counts they leave.
    """

    steps: int = 30
    guidance: float = 5.0
    guidance_rescale: float = 0.0
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int = 1
    seed: int | None = None
    strength: float = IMG2IMG_STRENGTH
    refiner_start: float = 0.8
    img2img: bool = False
    refined: bool = False
    # The command line's spelling of each field, where it differs, for the messages.
    flags: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        flag = dict(self.flags).get
        check_int("steps", self.steps, 1, MAX_STEPS, flag("steps"))
        check_real("guidance", self.guidance, 0.0, MAX_GUIDANCE, flag("guidance"))
        check_real("guidance_rescale", self.guidance_rescale, 0.0, 1.0, flag("guidance_rescale"))
        check_size("height", self.height, flag("height"))
        check_size("width", self.width, flag("width"))
        check_int("num_images_per_prompt", self.num_images_per_prompt, 1, None, flag("num_images_per_prompt"))
        check_seed(self.seed, flag("seed"))
        if self.img2img:
            check_real("strength", self.strength, 0.0, 1.0, flag("strength"), open_below=True)
            if strength_steps(self.steps, self.strength) < 1:
                raise InputError(
                    f"strength {self.strength:g} of {self.steps} steps leaves no step to run; raise steps to at "
                    f"least {math.ceil(1 / self.strength)} or strength to at least {1 / self.steps:.3g}."
                )
        if self.refined:
            check_real("refiner_start", self.refiner_start, 0.0, 1.0, flag("refiner_start"), open_below=True)
            if self.refiner_start == 1.0:
                raise InputError(f"{_named('refiner_start', flag('refiner_start'))} must be below 1, or the "
                                 "refiner gets no step; give a fraction such as 0.8.")

    def guided(self, unet) -> bool:
        """Whether the run on ``unet`` (its config) takes classifier-free guidance's batch of two."""
        return classifier_free(self.guidance, unet)


def classifier_free(guidance_scale: float, unet) -> bool:
    """Classifier-free guidance (a batch of two) runs only above 1, as in diffusers, and not on
    a UNet that takes the guidance scale as an input instead (an LCM distillation); ``unet`` is
    a UNet config."""
    return guidance_scale > 1.0 and unet.time_cond_proj_dim is None
