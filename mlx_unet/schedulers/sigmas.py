"""Noise-level schedules a sampler can run on instead of its evenly spaced timesteps.

Karras, exponential and beta re-space the sigmas between two ends (each sampler picks its ends,
as its diffusers class does: the spaced schedule's first and last sigmas, or the training
table's); Align-Your-Steps is a fixed list of timesteps per model family. All return float64,
descending, without the final zero.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, InputError

# The names ``--sigmas`` takes; "default" is the sampler's own spacing of the config's timesteps.
SIGMA_SCHEDULES = ("default", "karras", "exponential", "beta", "ays")
# The config flag that turns each re-spacing on in diffusers' schedulers.
SIGMA_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}

# Align Your Steps (Sabour et al. 2024): the 10-step timesteps optimised for each family, as
# diffusers publishes them (``diffusers.schedulers.AysSchedules``).
AYS_TIMESTEPS = {
    "sd": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24),
    "sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13),
}
AYS_STEPS = 10


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Karras et al. (2022): uniform in sigma ** (1 / 7)."""
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Uniform in log sigma."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), steps))


def beta_sigmas(sigma_min: float, sigma_max: float, steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. (2024), "Beta Sampling is All You Need": the ends pulled together by the
    quantiles of Beta(0.6, 0.6), dense at both ends of the schedule (diffusers' parameters)."""
    from scipy.stats import beta as beta_distribution  # the inverse incomplete beta function; only here

    quantiles = beta_distribution.ppf(1 - np.linspace(0, 1, steps), alpha, beta)
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


def respaced(kind: str, sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """``steps`` sigmas from ``sigma_max`` down to ``sigma_min`` by re-spacing ``kind``."""
    spacing = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}[kind]
    return spacing(sigma_min, sigma_max, steps)


def chosen_respacing(config) -> str | None:
    """Which re-spacing a config turns on ("karras", ...), or None; refuses two at once, as diffusers does."""
    chosen = [kind for kind, flag in SIGMA_FLAGS.items() if getattr(config, flag, False)]
    if len(chosen) > 1:
        raise ConfigError(f"only one of {', '.join(SIGMA_FLAGS[k] for k in chosen)} can be set.")
    return chosen[0] if chosen else None


def ays_timesteps(family: str, steps: int, sigma_table: np.ndarray) -> list[int]:
    """Align-Your-Steps timesteps of ``family`` ("sd" or "sdxl") for ``steps`` steps.

    Ten steps are the published list itself. For other counts the list is stretched as its
    authors advise: the ten sigmas (of ``sigma_table``, the training sigmas by timestep)
    interpolated linearly in log sigma over the step position, then mapped back to the nearest
    timesteps.
    """
    if family not in AYS_TIMESTEPS:
        raise InputError(f"Align-Your-Steps has schedules for {' and '.join(AYS_TIMESTEPS)} models, not {family!r}.")
    published = AYS_TIMESTEPS[family]
    if steps == AYS_STEPS:
        return list(published)
    log_sigmas = np.log(sigma_table[list(published)].astype(np.float64))
    stretched = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, AYS_STEPS), log_sigmas)
    log_table = np.log(sigma_table.astype(np.float64))
    timesteps = [int(np.abs(log_table - s).argmin()) for s in stretched]
    if len(set(timesteps)) != steps:
        raise InputError(f"{steps} Align-Your-Steps steps would repeat timesteps; use at most "
                         f"{len(set(timesteps))} or another --sigmas.")
    return timesteps
