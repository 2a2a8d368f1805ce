"""Which of a scheduler's timesteps a run takes: all of them, the last ``strength`` of them
(img2img, inpainting), or either side of a base -> refiner hand-off, as diffusers' pipelines
pick them (``get_timesteps``, ``denoising_start`` / ``denoising_end``)."""

from __future__ import annotations

import mlx.core as mx

from .arguments import IMG2IMG_STRENGTH, strength_steps


def schedule(scheduler, num_inference_steps: int, *, img2img: bool = False, strength: float = IMG2IMG_STRENGTH,
             denoising_start: float | None = None, denoising_end: float | None = None) -> tuple[mx.array, int]:
    """The timesteps a run takes, and the index of the first in the scheduler's whole schedule
    (set as its begin index). Sets the scheduler's timesteps. ``img2img`` starts at ``strength``
    of the schedule, or at ``denoising_start`` (the refiner's half of a hand-off);
    ``denoising_end`` stops the base half at the same cutoff."""
    if scheduler.custom_timesteps is None:
        scheduler.set_timesteps(num_inference_steps)
    else:
        scheduler.set_timesteps(timesteps=scheduler.custom_timesteps(num_inference_steps))
    timesteps = scheduler.timesteps
    train_steps = scheduler.config.num_train_timesteps
    begin = _start_index(scheduler, timesteps, num_inference_steps, strength, denoising_start, train_steps) if img2img else 0
    scheduler.set_begin_index(begin)
    timesteps = timesteps[begin:]
    if denoising_end is not None and 0 < denoising_end < 1:
        cutoff = int(round(train_steps - denoising_end * train_steps))
        timesteps = timesteps[: int((timesteps >= cutoff).sum().item())]
    return timesteps, begin


def _start_index(scheduler, timesteps, steps, strength, denoising_start, train_steps) -> int:
    """Where img2img starts in the schedule (diffusers' get_timesteps)."""
    if denoising_start is None:
        return max(steps - strength_steps(steps, strength), 0) * scheduler.order
    cutoff = int(round(train_steps - denoising_start * train_steps))
    remaining = int((timesteps < cutoff).sum().item())
    if scheduler.order == 2 and remaining % 2 == 0:
        remaining += 1  # do not start between the two evaluations of a second-order step
    return timesteps.shape[0] - remaining
