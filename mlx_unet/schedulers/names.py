"""Sampler and sigma-schedule names as people write them: ours, the web UI's (AUTOMATIC1111 /
Forge: "DPM++ 2M Karras", or "DPM++ 2M" with "Schedule type: Karras") and ComfyUI's
("dpmpp_2m_sde", "euler_ancestral", "uni_pc"). Every spelling is a row of a table here; the
samplers themselves are registered in ``schedulers/__init__.py``.
"""

from __future__ import annotations

import re

from ..errors import InputError
from .sigmas import SIGMA_SCHEDULES

# Our sampler -> the web UI's name for it (the name written into a PNG's parameters). Where the
# web UI has no such sampler (DPM++ 3M without SDE, DPM++ 2S without ancestral noise, DEIS,
# TCD) the name follows its pattern.
WEB_UI_SAMPLERS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m": "DPM++ 3M",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "dpmpp_2s": "DPM++ 2S",
    "unipc": "UniPC",
    "deis": "DEIS",
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lcm": "LCM",
    "tcd": "TCD",
}
# Our sigma schedule -> the web UI's "Schedule type" ("Automatic" is the sampler's own).
WEB_UI_SCHEDULES = {"default": "Automatic", "karras": "Karras", "exponential": "Exponential", "beta": "Beta",
                    "ays": "Align Your Steps"}

# Other spellings (after normalising: lower case, "++" -> "pp", spaces and hyphens -> "_").
_ALIASES = {
    "euler_ancestral": "euler_a",  # ComfyUI
    "k_euler": "euler",  # k-diffusion's names, used by older tools
    "k_euler_a": "euler_a",
    "k_euler_ancestral": "euler_a",
    "k_heun": "heun",
    "k_lms": "lms",
    "uni_pc": "unipc",  # ComfyUI; its uni_pc_bh2 is UniPC's default solver type
    "uni_pc_bh2": "unipc",
    "plms": "pndm",  # what the web UI calls PNDM with skip_prk_steps
    "dpm_solver_pp_2m": "dpmpp_2m",
    "dpmpp_2s_a": None,  # named to be refused clearly: the ancestral 2S is not diffusers' singlestep solver
    "dpmpp_2s_ancestral": None,
}
_SCHEDULE_ALIASES = {"automatic": "default", "normal": "default", "uniform": "default",
                     "align_your_steps": "ays"}


def _normalised(name: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[\s\-.]+", "_", name.strip().lower().replace("++", "pp"))).strip("_")


def sigma_schedule_name(name: str) -> str:
    """A sigma schedule's name in any known spelling -> ours (one of ``SIGMA_SCHEDULES``)."""
    key = _normalised(name)
    key = _SCHEDULE_ALIASES.get(key, key)
    if key not in SIGMA_SCHEDULES:
        raise InputError(f"unknown sigma schedule {name!r}; choose one of {', '.join(SIGMA_SCHEDULES)}.")
    return key


def sampler_name(name: str, known: tuple[str, ...] = tuple(WEB_UI_SAMPLERS)) -> tuple[str, str | None]:
    """(our sampler, the sigma schedule the name implies or None) for a name in any known
    spelling: "dpmpp_2m", "DPM++ 2M Karras", "euler_ancestral", "DPM++ 2M SDE Exponential"."""
    key = _normalised(name)
    schedule = None
    for suffix in sorted({*SIGMA_SCHEDULES, *_SCHEDULE_ALIASES} - {"default"}, key=len, reverse=True):
        if key.endswith("_" + suffix) and key != suffix:
            key, schedule = key[: -len(suffix) - 1], sigma_schedule_name(suffix)
            break
    sampler = _ALIASES.get(key, key)
    if sampler not in known:
        refused = key in _ALIASES
        raise InputError(f"{'mlx-unet has no' if refused else 'unknown'} sampler {name!r}; choose one of "
                         f"{', '.join(known)} (web UI and ComfyUI names are accepted too, e.g. 'DPM++ 2M Karras').")
    return sampler, schedule


def web_ui_name(sampler: str, sigmas: str | None) -> tuple[str, str | None]:
    """The web UI's (Sampler, Schedule type) for our sampler and sigma schedule."""
    return WEB_UI_SAMPLERS[sampler], None if sigmas in (None, "default") else WEB_UI_SCHEDULES[sigmas]
