"""What the scheduler parity tests (test_schedulers*.py) share: SDXL's scheduler config, latents
moved between our NHWC and diffusers' NCHW, the error measure, test ids, diffusers' noise draws
made ours, and the runs that step, noise or refuse both sides alike.

Each file keeps what is its family's own: how a pair is built from a config, how a schedule is
checked, and, where diffusers keeps the x0 estimate somewhere other than its step's output, how a
step is checked.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.schedulers import AysSchedules

from mlx_unet.errors import ConfigError

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SHAPE = (2, 8, 8, 4)  # NHWC; diffusers gets (2, 4, 8, 8)
AYS_SDXL = AysSchedules["StableDiffusionXLTimesteps"]


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


def rel(ours, theirs):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    return np.abs(ours - theirs).max() / np.abs(theirs).max()


def case_id(value, named=None, bare=()):
    """A parameter's test id: its name in ``named`` (name -> object, matched by identity), a dict
    as key=value pairs (the key alone for keys in ``bare``), a class by its name."""
    for name, known in (named or {}).items():
        if value is known:
            return name
    if isinstance(value, dict):
        return "-".join(k if k in bare else f"{k}={v}" for k, v in value.items()) or "as-configured"
    return getattr(value, "__name__", str(value))


class NoiseFeed:
    """Stands in for diffusers' randn_tensor: returns the noise given to ours, and counts the draws."""

    def __init__(self):
        self.next, self.draws = None, 0

    def __call__(self, shape, **kwargs):
        assert tuple(shape) == tuple(self.next.shape)
        self.draws += 1
        return self.next.to(kwargs.get("dtype") or torch.float32)


def feed_noise(monkeypatch, *modules):
    """A NoiseFeed in place of ``randn_tensor`` in each of diffusers' scheduler ``modules``."""
    feed = NoiseFeed()
    for module in modules:
        monkeypatch.setattr(module, "randn_tensor", feed)
    return feed


def set_steps(ours, theirs, steps):
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)


def run_both(ours, theirs, start, rng, sample, noise_feed=None, check_x0=True, check_step_index=True,
             **step_kwargs):
    """Step both from index ``start`` to the end on the same model outputs and noise; check every call.

    For the samplers whose diffusers step returns its x0 estimate (``check_x0=False`` for a class
    that returns none) and keeps a step index (``check_step_index=False`` where it keeps none).
    ``noise_feed`` hands diffusers the noise ours is given; ``step_kwargs`` go to diffusers' step.
    """
    x_ours, x_theirs = mx.array(sample), nchw(sample)
    for i in range(start, len(np.array(ours.timesteps))):
        t_ours, t_theirs = ours.timesteps[i], theirs.timesteps[i]
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_theirs = theirs.scale_model_input(x_theirs, t_theirs)
        assert rel(in_ours, nhwc(in_theirs)) < 1e-5, ("scale_model_input", i)
        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        if noise_feed is not None:
            noise_feed.next = nchw(noise)
        out_ours = ours.step(mx.array(model_output), t_ours, x_ours, noise=mx.array(noise))
        out_theirs = theirs.step(nchw(model_output), t_theirs, x_theirs, **step_kwargs)
        assert rel(out_ours.prev_sample, nhwc(out_theirs.prev_sample)) < 1e-5, ("prev_sample", i)
        if check_x0:
            assert rel(out_ours.pred_original_sample, nhwc(out_theirs.pred_original_sample)) < 1e-5, ("x0", i)
        if check_step_index:
            assert ours.step_index == theirs.step_index
        if hasattr(theirs, "state_in_first_order"):
            assert ours.state_in_first_order == theirs.state_in_first_order, i
        x_ours, x_theirs = out_ours.prev_sample, out_theirs.prev_sample
    assert x_ours.dtype == mx.float32


def run_trajectories(ours, theirs, step_counts, run=run_both, set_both=set_steps, seed=0, **run_options):
    """A whole run per step count, each from fresh starting noise, all drawn from one generator.

    ``set_both(ours, theirs, steps)`` sets (and may check) the schedules; ``run(ours, theirs,
    start, rng, sample, **run_options)`` steps and checks.
    """
    rng = np.random.default_rng(seed)
    for steps in step_counts:
        set_both(ours, theirs, steps)
        sample = rng.standard_normal(SHAPE).astype(np.float32) * ours.init_noise_sigma
        run(ours, theirs, 0, rng, sample, **run_options)


def img2img_start(ours, theirs, k, rng):
    """The image latent noised to timesteps[k] by both; checked equal; returned as NHWC numpy."""
    image = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    noisy_ours = ours.add_noise(mx.array(image), mx.array(noise), mx.repeat(ours.timesteps[k : k + 1], SHAPE[0]))
    noisy_theirs = theirs.add_noise(nchw(image), nchw(noise), theirs.timesteps[k : k + 1].repeat(SHAPE[0]))
    assert rel(noisy_ours, nhwc(noisy_theirs)) < 1e-5
    return np.array(noisy_ours)


def check_add_noise_per_item(ours, theirs, index, rng):
    """add_noise with each batch item at its own timestep, ``timesteps[index[item]]``."""
    image = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    index = np.array(index)
    noisy_ours = ours.add_noise(mx.array(image), mx.array(noise), ours.timesteps[mx.array(index)])
    noisy_theirs = theirs.add_noise(nchw(image), nchw(noise), theirs.timesteps[torch.from_numpy(index)])
    assert rel(noisy_ours, nhwc(noisy_theirs)) < 1e-5
    # The two items really got different noise levels.
    assert not np.allclose(np.array(noisy_ours[0] - image[0]), np.array(noisy_ours[1] - image[1]))


def check_refused(cls, config, field, value, changes=None, quoted=True):
    """``cls.from_config(config, **changes)`` (changes: ``{field: value}`` unless given) raises a
    ConfigError that names ``field`` (as its repr unless ``quoted`` is off: a message may list
    several fields bare) and ``value`` (unless None)."""
    with pytest.raises(ConfigError) as e:
        cls.from_config(config, **({field: value} if changes is None else changes))
    assert isinstance(e.value, ValueError)
    assert (repr(field) if quoted else field) in str(e.value)
    if value is not None:
        assert repr(value) in str(e.value)
