"""Run defaults for few-step models: distillations that make an image in 1-8 steps (SDXL-Turbo,
SDXL-Lightning, Hyper-SD, LCM, TCD, DMD2) and want their own sampler, step count and guidance.

A model is recognised from what it ships (an LCM or TCD scheduler config, a UNet that takes the
guidance scale as an input) or, as people name these files and repos, from the names of the
model and its LoRAs ("sdxl_lightning_4step_lora", "Hyper-SDXL-8steps-CFG-lora", "sdxl-turbo").
What the user sets always wins; these only replace the ordinary defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from .folder import PipelineFolder

STEPS, GUIDANCE = 30, 5.0  # the ordinary defaults


@dataclass(frozen=True)
class RunDefaults:
    """A model's defaults: ``sampler`` None keeps the shipped one; ``scheduler_config`` replaces
    fields of its config (the trailing spacing these distillations were trained on);
    ``timesteps`` are the model's own, for runs of exactly that many steps; ``size`` the pixels
    it was distilled at, where that is not its UNet config's."""

    label: str = ""  # "SDXL-Lightning 4-step", for the log; "" for an ordinary model
    steps: int = STEPS
    guidance: float = GUIDANCE
    sampler: str | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    timesteps: tuple[int, ...] | None = None
    size: int | None = None

    def describe(self) -> str:
        sampler = self.sampler or "its shipped sampler"
        spacing = self.scheduler_config.get("timestep_spacing")
        steps = f"{self.steps} step{'s' if self.steps != 1 else ''}"
        return f"{self.label}: {sampler}{f' ({spacing} spacing)' if spacing else ''}, {steps}, guidance {self.guidance:g}"


ORDINARY = RunDefaults()
_TRAILING = {"timestep_spacing": "trailing"}
_TCD = RunDefaults("TCD", 4, 0.0, "tcd")


def _steps_in(name: str, default: int) -> int:
    """The step count a file name gives ("4step", "8-steps", "2steps"), else ``default``."""
    match = re.search(r"(\d+)[-_ ]?steps?", name)
    return int(match.group(1)) if match else default


def _from_name(name: str, guidance_embedded: bool) -> RunDefaults | None:
    """The defaults a model or LoRA name announces, as its authors document them."""
    if "lightning" in name:  # ByteDance: Euler, trailing, no guidance
        steps = _steps_in(name, 4)
        return RunDefaults(f"SDXL-Lightning {steps}-step", steps, 0.0, "euler", _TRAILING)
    if re.search(r"hyper[-_ ]?sd", name):  # ByteDance: DDIM trailing; the CFG-preserving LoRAs keep guidance
        steps = _steps_in(name, 8)
        if steps == 1:  # the one-step UNet: LCM at timestep 800
            return RunDefaults("Hyper-SD 1-step", 1, 0.0, "lcm", timesteps=(800,))
        return RunDefaults(f"Hyper-SD {steps}-step", steps, 5.0 if "cfg" in name else 0.0, "ddim", _TRAILING)
    if "dmd2" in name:  # four fixed timesteps under LCM, no guidance
        return RunDefaults("DMD2 4-step", 4, 0.0, "lcm", timesteps=(999, 749, 499, 249))
    if "turbo" in name:  # Stability's adversarial distillations: ancestral Euler, trailing, 1 step,
        # 512 px (its diffusers config says so; a single file's published SDXL config does not)
        return RunDefaults("Turbo", 1, 0.0, "euler_a", _TRAILING, size=512)
    if "tcd" in name:
        return _TCD
    if re.search(r"(^|[^a-z])lcm", name):
        return _lcm(guidance_embedded)
    return None


def _lcm(guidance_embedded: bool) -> RunDefaults:
    # A distilled LCM UNet takes the guidance scale as an input (8, its authors' default, costs
    # nothing); an LCM-LoRA on an ordinary UNet runs without classifier-free guidance.
    return RunDefaults("LCM", 4, 8.0 if guidance_embedded else 1.0, "lcm")


def run_defaults(parts: PipelineFolder, names: Iterable[str] = ()) -> RunDefaults:
    """The defaults of the pipeline in ``parts``, run with the models and LoRAs ``names``."""
    guidance_embedded = parts.unet.time_cond_proj_dim is not None
    shipped = (parts.scheduler or {}).get("_class_name")
    for name in names:
        defaults = _from_name(name.lower(), guidance_embedded)
        if defaults is not None:
            return defaults
    if shipped == "TCDScheduler":
        return _TCD
    if shipped == "LCMScheduler" or guidance_embedded:
        return _lcm(guidance_embedded)
    return ORDINARY
