"""Every sampler against its diffusers scheduler over a whole trajectory: the exactness figure in
README.md, for each sampler on its own spacing and on Karras and beta sigmas where it takes them.

    python benchmarks/sampler_errors.py                 # 20 steps on SDXL's schedule
    python benchmarks/sampler_errors.py --steps 7 30

Both sides step from the same start through the same random model outputs (and, for the
stochastic samplers, the same noise, handed to diffusers' ``randn_tensor``); printed is the worst
step's max |ours - diffusers| / max |diffusers| over the trajectory. No timing: the samplers'
cost is a few elementwise ops a step, nothing beside the UNet's.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import diffusers  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mlx_unet.schedulers import SAMPLERS, make_scheduler, sigma_schedules  # noqa: E402
from mlx_unet.schedulers.sigmas import SIGMA_FLAGS  # noqa: E402

SDXL = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading", num_train_timesteps=1000, prediction_type="epsilon")
SHAPE = (2, 8, 8, 4)  # NHWC; diffusers gets the NCHW transpose


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def trajectory_error(sampler: str, sigmas: str | None, steps: int) -> float:
    cls, implied = SAMPLERS[sampler]
    ours = make_scheduler(sampler, SDXL, sigmas=sigmas)
    flags = {} if sigmas is None else {SIGMA_FLAGS[sigmas]: True}
    theirs = getattr(diffusers, cls.__name__).from_config({**SDXL, **implied, **flags})
    module = importlib.import_module(type(theirs).__module__)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    rng = np.random.default_rng(0)
    start = rng.standard_normal(SHAPE).astype(np.float32) * ours.init_noise_sigma
    x_ours, x_theirs, worst = mx.array(start), nchw(start), 0.0
    for i in range(len(np.array(ours.timesteps))):
        output, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
        module.randn_tensor = lambda *args, _noise=noise, **kwargs: nchw(_noise)  # the same draw as ours
        ours.scale_model_input(x_ours, ours.timesteps[i])
        theirs.scale_model_input(x_theirs, theirs.timesteps[i])
        x_ours = ours.step(mx.array(output), ours.timesteps[i], x_ours, noise=mx.array(noise)).prev_sample
        x_theirs = theirs.step(nchw(output), theirs.timesteps[i], x_theirs,
                               **({"eta": ours.eta} if sampler == "tcd" else {})).prev_sample
        reference = x_theirs.numpy().transpose(0, 2, 3, 1)
        worst = max(worst, float(np.abs(np.array(x_ours) - reference).max() / np.abs(reference).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20])
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()
    for steps in args.steps:
        print(f"{steps} steps: worst relative error of prev_sample over the trajectory")
        for sampler in SAMPLERS:
            for sigmas in (None, "karras", "beta"):
                if sigmas is None or sigmas in sigma_schedules(sampler):
                    name = sampler + ("" if sigmas is None else f" + {sigmas}")
                    print(f"  {name:24s} {trajectory_error(sampler, sigmas, steps):.1e}")


if __name__ == "__main__":
    main()
