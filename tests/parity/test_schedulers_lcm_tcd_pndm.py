"""LCM, TCD and PNDM against diffusers' own classes, built from the same config dict in the same process.

Nothing here is a hard-coded number: every schedule, step and noised latent is compared with what
diffusers computes for the same inputs in this run. Ours run on NHWC arrays, diffusers' on the
NCHW transpose. The noise LCM / TCD add between steps is fed to diffusers through its modules'
``randn_tensor``; TCD's x0 estimate, which diffusers keeps in a local, is read off its frame.
"""

import inspect
import sys
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import LCMScheduler as TorchLCM, PNDMScheduler as TorchPNDM, TCDScheduler as TorchTCD
from diffusers.schedulers import scheduling_lcm, scheduling_tcd
from scheduler_runs import (AYS_SDXL, SDXL, SHAPE, case_id as plain_case_id, check_add_noise_per_item,
                            check_refused, feed_noise, img2img_start, nchw, nhwc, rel, run_trajectories, set_steps)

from mlx_unet.errors import ConfigError, InputError
from mlx_unet.schedulers.lcm import LCMScheduler
from mlx_unet.schedulers.pndm import PNDMScheduler
from mlx_unet.schedulers.tcd import TCDScheduler

# diffusers' np.array(torch_tensor) calls trip a numpy 2 deprecation notice; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("torch_math_correctly_rounded")]

# SDXL (scheduler_runs) is what TCD-SDXL-LoRA users load TCD from.
# latent-consistency/lcm-lora-sdxl and latent-consistency/lcm-sdxl
LCM_SDXL = {
    "_class_name": "LCMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "clip_sample_range": 1.0, "num_train_timesteps": 1000, "original_inference_steps": 50,
    "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "set_alpha_to_one": True, "steps_offset": 1,
    "thresholding": False, "timestep_scaling": 10.0, "timestep_spacing": "leading", "trained_betas": None,
}
# runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}

TORCH = {LCMScheduler: TorchLCM, TCDScheduler: TorchTCD, PNDMScheduler: TorchPNDM}
# Where diffusers keeps the x0 estimate that ours returns as pred_original_sample (PNDM has none).
X0_LOCAL = {TorchLCM: "denoised", TorchTCD: "pred_original_sample"}
CONFIG_NAMES = {"lcm-sdxl": LCM_SDXL, "sdxl": SDXL, "sd15": SD15}


def pair(cls, config, eta=None, **changes):
    """(ours, diffusers') for one class, from ``config`` with ``changes``."""
    extra = {} if eta is None else {"eta": eta}
    return cls.from_config(config, **extra, **changes), TORCH[cls].from_config(config, **changes)


def case_id(value):
    """scheduler_runs' case_id, with the configs above by name."""
    return plain_case_id(value, named=CONFIG_NAMES)


@pytest.fixture
def noise_feed(monkeypatch):
    return feed_noise(monkeypatch, scheduling_lcm, scheduling_tcd)


@contextmanager
def locals_at_return(function):
    """The local variables of each call of ``function``, as it returns."""
    code, seen = function.__code__, []

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is code:
            seen.append(dict(frame.f_locals))

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(previous)


def run_both(ours, theirs, start, rng, sample, noise_feed, eta=None):
    """Step both from index ``start`` to the end on the same model outputs and noise; check each step."""
    x_ours, x_theirs = mx.array(sample), nchw(sample)
    kwargs = {} if eta is None else {"eta": eta}
    for i in range(start, len(np.array(ours.timesteps))):
        t_ours, t_theirs = ours.timesteps[i], theirs.timesteps[i]
        assert int(t_ours.item()) == int(t_theirs)
        in_ours, in_theirs = ours.scale_model_input(x_ours, t_ours), theirs.scale_model_input(x_theirs, t_theirs)
        assert rel(in_ours, nhwc(in_theirs)) < 1e-5, ("scale_model_input", i)
        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        noise_feed.next = nchw(noise)
        out_ours = ours.step(mx.array(model_output), t_ours, x_ours, noise=mx.array(noise))
        with locals_at_return(type(theirs).step) as seen:
            out_theirs = theirs.step(nchw(model_output), t_theirs, x_theirs, **kwargs)
        assert rel(out_ours.prev_sample, nhwc(out_theirs.prev_sample)) < 1e-5, ("prev_sample", i)
        if type(theirs) in X0_LOCAL:
            assert rel(out_ours.pred_original_sample, nhwc(seen[-1][X0_LOCAL[type(theirs)]])) < 1e-5, ("x0", i)
            assert ours.step_index == theirs.step_index
        else:
            assert out_ours.pred_original_sample is None
        x_ours, x_theirs = out_ours.prev_sample, out_theirs.prev_sample
    assert x_ours.dtype == mx.float32


def check_timesteps(ours, theirs):
    t_ours, t_theirs = np.array(ours.timesteps), theirs.timesteps.numpy()
    assert t_ours.dtype == np.int32 and t_theirs.dtype == np.int64
    np.testing.assert_array_equal(t_ours, t_theirs)
    assert ours.num_inference_steps == theirs.num_inference_steps


def set_both(ours, theirs, steps):
    """set_timesteps(steps) on both, then check the schedules agree."""
    set_steps(ours, theirs, steps)
    check_timesteps(ours, theirs)


# --------------------------------------------------------------------------- LCM / TCD schedules


@pytest.mark.parametrize("cls", [LCMScheduler, TCDScheduler], ids=case_id)
@pytest.mark.parametrize("config,changes", [
    (LCM_SDXL, {}), (SDXL, {}), (LCM_SDXL, {"original_inference_steps": 30}),
    (LCM_SDXL, {"num_train_timesteps": 700, "original_inference_steps": 64}),
], ids=case_id)
def test_consistency_schedule_matches_diffusers(cls, config, changes):
    ours, theirs = pair(cls, config, **changes)
    check_timesteps(ours, theirs)  # before set_timesteps: the training range
    assert ours.init_noise_sigma == theirs.init_noise_sigma and ours.order == theirs.order
    for strength in (1.0, 0.6, 0.35):
        for steps in range(1, 66):
            try:
                theirs.set_timesteps(steps, strength=strength)
            except ValueError:
                with pytest.raises(InputError):
                    ours.set_timesteps(steps, strength=strength)
                continue
            ours.set_timesteps(steps, strength=strength)
            check_timesteps(ours, theirs)


@pytest.mark.parametrize("cls", [LCMScheduler, TCDScheduler], ids=case_id)
def test_custom_timesteps_and_strength_match_diffusers(cls):
    ours, theirs = pair(cls, LCM_SDXL)
    assert ours.takes_timesteps == ("timesteps" in inspect.signature(theirs.set_timesteps).parameters)
    for timesteps in ([999, 759, 499, 259], AYS_SDXL, [500, 20]):
        for strength in (1.0, 0.5, 0.25):
            theirs.set_timesteps(timesteps=timesteps, strength=strength)
            if len(theirs.timesteps) == 0:  # diffusers leaves nothing to run; ours says so
                with pytest.raises(InputError, match="leaves none"):
                    ours.set_timesteps(timesteps=timesteps, strength=strength)
                continue
            ours.set_timesteps(timesteps=timesteps, strength=strength)
            check_timesteps(ours, theirs)
    ours.set_timesteps(timesteps=mx.array(AYS_SDXL))
    theirs.set_timesteps(timesteps=AYS_SDXL)
    check_timesteps(ours, theirs)


# --------------------------------------------------------------------------- LCM / TCD trajectories

CONSISTENCY_CASES = [
    (LCMScheduler, LCM_SDXL, None, {}, (1, 2, 4, 8)),
    (LCMScheduler, LCM_SDXL, None, {"prediction_type": "v_prediction"}, (1, 4, 7, 20)),
    (LCMScheduler, SDXL, None, {}, (4, 7, 20)),
    (LCMScheduler, LCM_SDXL, None, {"clip_sample": True, "clip_sample_range": 0.8, "beta_schedule": "linear"}, (4, 7)),
    (LCMScheduler, LCM_SDXL, None, {"timestep_scaling": 2.5, "original_inference_steps": 25}, (4, 7, 20)),
    # c_skip is below 1e-5 at t >= 19 with the usual scaling 10: a small scaling makes it count.
    (LCMScheduler, LCM_SDXL, None, {"timestep_scaling": 0.1}, (4, 8)),
    # Inert in diffusers' LCM (the schedule reads none; no negative timestep reaches the final alpha).
    (LCMScheduler, LCM_SDXL, None, {"set_alpha_to_one": False, "timestep_spacing": "trailing", "steps_offset": 7}, (4,)),
    (TCDScheduler, SDXL, 0.0, {}, (2, 4, 7, 8, 20)),
    (TCDScheduler, SDXL, 0.3, {}, (2, 4, 7, 8, 20)),
    (TCDScheduler, SDXL, 1.0, {}, (2, 4, 7, 8, 20)),
    (TCDScheduler, SDXL, 0.3, {"prediction_type": "v_prediction"}, (4, 7, 20)),
    (TCDScheduler, SDXL, 0.55, {"beta_schedule": "linear", "original_inference_steps": 100}, (4, 33)),
    # Inert in diffusers' TCD: its step neither clips nor thresholds nor scales.
    (TCDScheduler, LCM_SDXL, 0.3, {"thresholding": True, "clip_sample": True, "timestep_scaling": 3.0}, (4,)),
]


@pytest.mark.parametrize("cls,config,eta,changes,step_counts", CONSISTENCY_CASES, ids=case_id)
def test_consistency_trajectory_matches_diffusers(cls, config, eta, changes, step_counts, noise_feed):
    ours, theirs = pair(cls, config, eta=eta, **changes)
    run_trajectories(ours, theirs, step_counts, run_both, set_both, noise_feed=noise_feed, eta=eta)


@pytest.mark.parametrize("cls,eta", [(LCMScheduler, None), (TCDScheduler, 0.3), (TCDScheduler, 0.0)], ids=case_id)
def test_custom_timesteps_trajectory(cls, eta, noise_feed):
    ours, theirs = pair(cls, LCM_SDXL, eta=eta)
    rng = np.random.default_rng(4)
    # The last list ends where LCM's boundary condition matters (c_skip 0.0025 at t = 1).
    for timesteps in ([999, 759, 499, 259], AYS_SDXL, [999, 499, 99, 9, 1]):
        ours.set_timesteps(timesteps=timesteps)
        theirs.set_timesteps(timesteps=timesteps)
        run_both(ours, theirs, 0, rng, rng.standard_normal(SHAPE).astype(np.float32), noise_feed, eta)


@pytest.mark.parametrize("use_begin_index", [True, False], ids=["set_begin_index", "by_timestep"])
@pytest.mark.parametrize("cls,eta", [(LCMScheduler, None), (TCDScheduler, 0.3), (TCDScheduler, 1.0)], ids=case_id)
def test_consistency_img2img_start_midway(cls, eta, use_begin_index, noise_feed):
    """Our pipelines' img2img, as diffusers' SD / SDXL img2img pipelines run LCM and TCD:
    set_timesteps(n), begin at n - int(n * strength)."""
    ours, theirs = pair(cls, LCM_SDXL, eta=eta)
    rng = np.random.default_rng(1)
    for steps, strength in ((8, 0.6), (4, 0.5), (7, 0.3)):
        set_steps(ours, theirs, steps)
        k = steps - int(steps * strength)
        if use_begin_index:
            ours.set_begin_index(k)
            theirs.set_begin_index(k)
        run_both(ours, theirs, k, rng, img2img_start(ours, theirs, k, rng), noise_feed, eta)


@pytest.mark.parametrize("cls,eta", [(LCMScheduler, None), (TCDScheduler, 0.3)], ids=case_id)
def test_consistency_img2img_by_strength(cls, eta, noise_feed):
    """diffusers' LCM img2img pipeline: set_timesteps(n, strength=s), all n steps from the first.
    With custom timesteps, strength drops their head and the cut run's last step adds noise."""
    ours, theirs = pair(cls, LCM_SDXL, eta=eta)
    rng = np.random.default_rng(2)
    for steps, strength in ((4, 0.5), (4, 0.3), (2, 0.8)):
        ours.set_timesteps(steps, strength=strength)
        theirs.set_timesteps(steps, strength=strength)
        check_timesteps(ours, theirs)
        run_both(ours, theirs, 0, rng, img2img_start(ours, theirs, 0, rng), noise_feed, eta)
    ours.set_timesteps(timesteps=AYS_SDXL, strength=0.5)
    theirs.set_timesteps(timesteps=AYS_SDXL, strength=0.5)
    check_timesteps(ours, theirs)
    run_both(ours, theirs, 0, rng, img2img_start(ours, theirs, 0, rng), noise_feed, eta)


def test_tcd_intermediate_timestep_is_diffusers_float32_floor():
    """s = floor((1 - eta) t_next) with diffusers' expression (a Python float times an int64
    tensor), for every training timestep: float64 arithmetic would differ for some."""
    sched = TCDScheduler.from_config(SDXL)
    t_next = torch.arange(1000)
    for eta in [0.3, 0.35, 0.9, 1 / 3, *np.linspace(0, 1, 21).tolist()]:
        sched.eta = eta
        theirs = torch.floor((1 - eta) * t_next).to(dtype=torch.long).numpy()
        np.testing.assert_array_equal([sched.intermediate_timestep(t) for t in range(1000)], theirs)


# --------------------------------------------------------------------------- PNDM


@pytest.mark.parametrize("skip_prk_steps", [True, False], ids=["plms", "prk"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_pndm_schedule_matches_diffusers(skip_prk_steps, spacing):
    for config in (SD15, SDXL):
        ours, theirs = pair(PNDMScheduler, config, skip_prk_steps=skip_prk_steps, timestep_spacing=spacing)
        assert ours.takes_timesteps == ("timesteps" in inspect.signature(theirs.set_timesteps).parameters)
        assert ours.init_noise_sigma == theirs.init_noise_sigma and ours.order == theirs.order
        for steps in (1, 2, 3, 4, 5, 7, 20, 25, 50, 61, 999):
            if not skip_prk_steps and steps < 4:
                with pytest.raises(ValueError):  # diffusers: a shape mismatch
                    theirs.set_timesteps(steps)
                with pytest.raises(InputError, match="at least 4 steps"):
                    ours.set_timesteps(steps)
                continue
            set_both(ours, theirs, steps)


PNDM_CASES = [
    (SD15, {}, (1, 2, 4, 7, 20, 50)),
    (SD15, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, (4, 7, 20)),
    (SD15, {"set_alpha_to_one": True, "timestep_spacing": "linspace"}, (4, 7, 20)),
    (SD15, {"skip_prk_steps": False}, (4, 7, 20)),
    (SD15, {"skip_prk_steps": False, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, (4, 7)),
    (SD15, {"skip_prk_steps": False, "timestep_spacing": "linspace", "set_alpha_to_one": True}, (5, 7)),
    # trailing, 61 steps: diffusers' float arange yields a timestep -1, read as the table's last.
    (SD15, {"timestep_spacing": "trailing"}, (61,)),
    (SDXL, {"beta_schedule": "linear", "steps_offset": 0}, (7, 20)),
    # diffusers' PNDM takes no rescale_betas_zero_snr: dropped unread by both.
    (SD15, {"rescale_betas_zero_snr": True}, (4,)),
]


@pytest.mark.parametrize("config,changes,step_counts", PNDM_CASES, ids=case_id)
def test_pndm_trajectory_matches_diffusers(config, changes, step_counts, noise_feed):
    ours, theirs = pair(PNDMScheduler, config, **changes)
    run_trajectories(ours, theirs, step_counts, run_both, set_both, noise_feed=noise_feed)


@pytest.mark.parametrize("skip_prk_steps", [True, False], ids=["plms", "prk"])
def test_pndm_img2img_start_midway(skip_prk_steps, noise_feed):
    """As diffusers' SD img2img runs PNDM: the counter starts afresh at timesteps[k] (PNDM has no
    begin index; ours accepts set_begin_index and ignores it)."""
    ours, theirs = pair(PNDMScheduler, SD15, skip_prk_steps=skip_prk_steps)
    rng = np.random.default_rng(1)
    for steps, strength in ((25, 0.6), (20, 0.75), (7, 0.5)):
        set_steps(ours, theirs, steps)
        k = steps - int(steps * strength)
        ours.set_begin_index(k)
        run_both(ours, theirs, k, rng, img2img_start(ours, theirs, k, rng), noise_feed)


# --------------------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("cls,config", [(LCMScheduler, LCM_SDXL), (TCDScheduler, SDXL), (PNDMScheduler, SD15)],
                         ids=case_id)
def test_add_noise_per_item_timesteps(cls, config):
    ours, theirs = pair(cls, config)
    set_steps(ours, theirs, 8)
    check_add_noise_per_item(ours, theirs, [1, 6], np.random.default_rng(2))


def test_stochastic_flags_and_noise_drawn_when_none_given():
    def run(sched, seed):
        sched.set_timesteps(4)
        mx.random.seed(seed)
        x = mx.ones(SHAPE)
        return np.array(sched.step(mx.zeros(SHAPE), sched.timesteps[0], x).prev_sample)

    lcm, tcd, pndm = LCMScheduler.from_config(LCM_SDXL), TCDScheduler.from_config(SDXL), PNDMScheduler.from_config(SD15)
    assert lcm.stochastic and tcd.stochastic and not pndm.stochastic
    for sched in (lcm, tcd):
        assert np.array_equal(run(sched, 0), run(sched, 0)) and not np.array_equal(run(sched, 0), run(sched, 1))
    tcd.eta = 0
    assert not tcd.stochastic and np.array_equal(run(tcd, 0), run(tcd, 1))


@pytest.mark.parametrize("cls,config", [(LCMScheduler, LCM_SDXL), (TCDScheduler, SDXL), (PNDMScheduler, SD15)],
                         ids=case_id)
def test_half_precision_sample_keeps_its_dtype(cls, config):
    sched = cls.from_config(config)
    sched.set_timesteps(5)
    x = mx.ones(SHAPE, dtype=mx.float16)
    for t in sched.timesteps:
        x = sched.step(mx.zeros(SHAPE, dtype=mx.float16), t, x, noise=mx.zeros(SHAPE)).prev_sample
        assert x.dtype == mx.float16


def test_tcd_eta_is_the_schedulers_not_the_configs():
    default = TCDScheduler.from_config(SDXL)
    assert default.eta == 0.3 == TCDScheduler().eta  # diffusers' step default
    sched = TCDScheduler.from_config(SDXL, eta=0.7, prediction_type="v_prediction")
    assert sched.eta == 0.7 and sched.config.prediction_type == "v_prediction"
    assert sched.config == TCDScheduler.from_config(SDXL, prediction_type="v_prediction").config
    assert TCDScheduler(sched.config, eta=0).eta == 0.0 and "eta=0.7" in repr(sched)
    with pytest.raises(ConfigError, match="'eta'"):  # a config never carries it
        TCDScheduler.from_config({**SDXL, "eta": 0.5})
    for bad in (-0.1, 1.5, True, "0.3"):
        with pytest.raises(InputError, match="eta"):
            TCDScheduler.from_config(SDXL, eta=bad)
        with pytest.raises(InputError, match="eta"):
            sched.eta = bad


def test_bad_calls_are_refused():
    lcm = LCMScheduler.from_config(LCM_SDXL)
    with pytest.raises(InputError, match="set_timesteps"):
        lcm.step(mx.zeros(SHAPE), 999, mx.zeros(SHAPE))
    bad_calls = [
        dict(num_inference_steps=51), dict(), dict(num_inference_steps=4, timesteps=[999, 499]),
        dict(num_inference_steps=4, strength=0.0), dict(num_inference_steps=4, strength=1.5),
        dict(timesteps=[499, 999]), dict(timesteps=[1000, 499]), dict(timesteps=[999, 499, -1]),
        dict(timesteps=[999.5, 499]), dict(timesteps=[999, 499], strength=0.1),
    ]
    for kwargs in bad_calls:
        with pytest.raises(InputError):
            lcm.set_timesteps(**kwargs)
    lcm.set_timesteps(4)
    with pytest.raises(InputError, match="noise has shape"):
        lcm.step(mx.zeros(SHAPE), lcm.timesteps[0], mx.zeros(SHAPE), noise=mx.zeros((1, 8, 8, 4)))
    pndm = PNDMScheduler.from_config(SD15)
    with pytest.raises(InputError, match="set_timesteps"):
        pndm.step(mx.zeros(SHAPE), 981, mx.zeros(SHAPE))
    pndm.set_timesteps(10)
    with pytest.raises(InputError, match="outside"):
        pndm.step(mx.zeros(SHAPE), 1000, mx.zeros(SHAPE))


REFUSED = [
    (LCMScheduler, "thresholding", True),
    (LCMScheduler, "prediction_type", "sample"),
    (LCMScheduler, "rescale_betas_zero_snr", True),
    (LCMScheduler, "beta_schedule", "squaredcos_cap_v2"),
    (LCMScheduler, "original_inference_steps", 2000),
    (LCMScheduler, "original_inference_steps", 0),
    (LCMScheduler, "timestep_scaling", "ten"),
    (TCDScheduler, "prediction_type", "sample"),
    (TCDScheduler, "rescale_betas_zero_snr", True),
    (TCDScheduler, "some_new_option", 3),
    (PNDMScheduler, "prediction_type", "sample"),
    (PNDMScheduler, "beta_schedule", "squaredcos_cap_v2"),
    (PNDMScheduler, "timestep_spacing", "uniform"),
    (PNDMScheduler, "skip_prk_steps", "yes"),
]


@pytest.mark.parametrize("cls,field,value", REFUSED, ids=case_id)
def test_unsupported_config_value_is_refused_by_name(cls, field, value):
    check_refused(cls, LCM_SDXL if cls is not PNDMScheduler else SD15, field, value)
