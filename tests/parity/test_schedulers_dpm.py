"""The DPM-Solver family against diffusers' own classes, built from the same config dict in the same process.

DPM++ 2M / 3M and their SDE forms (``DPMSolverMultistepScheduler``), DPM++ 2S / 3S / 1S
(``DPMSolverSinglestepScheduler``), over the sigma re-spacings, custom (Align-Your-Steps)
timesteps and img2img starts. Every number is compared with what diffusers computes for the same
inputs; the SDE forms get the same noise (diffusers' ``randn_tensor`` is replaced by a feed). Ours
run on NHWC arrays, diffusers' on the NCHW transpose.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from diffusers import DPMSolverMultistepScheduler as TorchMultistep
from diffusers import DPMSolverSinglestepScheduler as TorchSinglestep
from diffusers.schedulers import scheduling_dpmsolver_multistep, scheduling_dpmsolver_singlestep
from scheduler_runs import (AYS_SDXL, SDXL, SHAPE, case_id, check_add_noise_per_item, check_refused,
                            feed_noise, img2img_start, nchw, nhwc, rel, run_trajectories)

from mlx_unet.errors import ConfigError, InputError
from mlx_unet.schedulers.dpm_singlestep import DPMSolverSinglestepScheduler
from mlx_unet.schedulers.dpm_solver import DPMSolverMultistepScheduler

# diffusers' np.array(torch_tensor) calls trip a numpy 2 deprecation notice; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("torch_math_correctly_rounded")]

MULTI, SINGLE = DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
TORCH_CLASS = {MULTI: TorchMultistep, SINGLE: TorchSinglestep}
RESPACINGS = {"default": {}, "karras": {"use_karras_sigmas": True},
              "exponential": {"use_exponential_sigmas": True}, "beta": {"use_beta_sigmas": True}}


def pair(cls, **changes):
    return cls.from_config(SDXL, **changes), TORCH_CLASS[cls].from_config(SDXL, **changes)


@pytest.fixture
def noise_feed(monkeypatch):
    return feed_noise(monkeypatch, scheduling_dpmsolver_multistep, scheduling_dpmsolver_singlestep)


def set_both(ours, theirs, steps=None, timesteps=None):
    """set_timesteps on both, then check the schedules agree."""
    ours.set_timesteps(steps, timesteps=timesteps)
    theirs.set_timesteps(steps, timesteps=timesteps)
    t_ours, t_theirs = np.array(ours.timesteps), theirs.timesteps.numpy()
    assert t_ours.dtype.kind == t_theirs.dtype.kind == "i"
    np.testing.assert_array_equal(t_ours, t_theirs)
    assert ours.sigmas.dtype == mx.float32
    np.testing.assert_allclose(np.array(ours.sigmas), theirs.sigmas.numpy(), rtol=1e-5, atol=0)
    assert ours.num_inference_steps == theirs.num_inference_steps
    assert isinstance(ours.init_noise_sigma, float) and ours.init_noise_sigma == float(theirs.init_noise_sigma)
    assert ours.order == theirs.order


def run_both(ours, theirs, start, rng, sample, noise_feed, tol=1e-5):
    """Step both from index ``start`` to the end on the same model outputs; check every step.

    diffusers returns no x0 estimate, but keeps it as its newest ``model_outputs`` entry.
    """
    x_ours, x_theirs = mx.array(sample), nchw(sample)
    draws = noise_feed.draws
    for i in range(start, len(np.array(ours.timesteps))):
        t_ours, t_theirs = ours.timesteps[i], theirs.timesteps[i]
        in_ours = ours.scale_model_input(x_ours, t_ours)
        assert rel(in_ours, nhwc(theirs.scale_model_input(x_theirs, t_theirs))) < tol, ("scale_model_input", i)
        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        noise_feed.next = nchw(noise)
        out_ours = ours.step(mx.array(model_output), t_ours, x_ours, noise=mx.array(noise))
        out_theirs = theirs.step(nchw(model_output), t_theirs, x_theirs)
        assert rel(out_ours.prev_sample, nhwc(out_theirs.prev_sample)) < tol, ("prev_sample", i)
        assert rel(out_ours.pred_original_sample, nhwc(theirs.model_outputs[-1])) < tol, ("x0", i)
        assert ours.step_index == theirs.step_index
        x_ours, x_theirs = out_ours.prev_sample, out_theirs.prev_sample
    assert x_ours.dtype == mx.float32
    # The SDE forms drew noise at every step, so ours really got diffusers' noise.
    assert noise_feed.draws - draws == (len(np.array(ours.timesteps)) - start) * ours.stochastic


def trajectories(cls, changes, step_counts, noise_feed, tol=1e-5):
    ours, theirs = pair(cls, **changes)
    assert ours.stochastic == (changes.get("algorithm_type") == "sde-dpmsolver++")
    run_trajectories(ours, theirs, step_counts, run_both, set_both, noise_feed=noise_feed, tol=tol)


# --------------------------------------------------------------------------- schedules

SCHEDULE_CASES = [(MULTI, {"timestep_spacing": spacing, **flags})
                  for spacing in ("leading", "trailing", "linspace") for flags in RESPACINGS.values()]
SCHEDULE_CASES += [(SINGLE, flags) for flags in RESPACINGS.values()] + [
    (MULTI, {"lambda_min_clipped": -2.5, "timestep_spacing": "linspace"}),
    (MULTI, {"lambda_min_clipped": -2.5, "timestep_spacing": "trailing"}),
    (SINGLE, {"lambda_min_clipped": -2.5}),
    # Not fields of diffusers' single-step class: read past there, so without effect here too.
    (SINGLE, {"timestep_spacing": "trailing", "steps_offset": 0, "rescale_betas_zero_snr": True}),
    (MULTI, {"beta_schedule": "linear", "use_beta_sigmas": True}),
    (SINGLE, {"trained_betas": list(np.linspace(1e-4, 0.02, 1000) ** 1.5), "use_exponential_sigmas": True}),
]


@pytest.mark.parametrize("cls,changes", SCHEDULE_CASES, ids=case_id)
def test_schedule_matches_diffusers(cls, changes):
    ours, theirs = pair(cls, **changes)
    # 61 "trailing" steps: diffusers' float arange yields 62 timesteps (re-spacings still place 61).
    for steps in (1, 4, 7, 20, 25, 50, 61):
        set_both(ours, theirs, steps)
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    assert np.array_equal(np.array(ours.scale_model_input(mx.array(x), ours.timesteps[0])), x)


@pytest.mark.parametrize("cls", [MULTI, SINGLE], ids=case_id)
def test_custom_timesteps_align_your_steps(cls, noise_feed):
    for changes in ({}, {"solver_order": 3, "prediction_type": "v_prediction"}):
        ours, theirs = pair(cls, **changes)
        set_both(ours, theirs, timesteps=AYS_SDXL)
        rng = np.random.default_rng(4)
        run_both(ours, theirs, 0, rng, rng.standard_normal(SHAPE).astype(np.float32), noise_feed)
    ours.set_timesteps(timesteps=mx.array(AYS_SDXL))  # an mx.array is taken too
    assert np.array(ours.timesteps).tolist() == AYS_SDXL


@pytest.mark.parametrize("cls", [MULTI, SINGLE], ids=case_id)
def test_custom_timesteps_refusals(cls):
    ours = cls.from_config(SDXL)
    for bad in ([], [999.5, 500], [1000, 500], [[999]], ["999"]):
        with pytest.raises(InputError, match="custom timesteps"):
            ours.set_timesteps(timesteps=bad)
    with pytest.raises(InputError, match="exactly one"):
        ours.set_timesteps(10, timesteps=AYS_SDXL)
    with pytest.raises(InputError, match="exactly one"):
        ours.set_timesteps()
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        with pytest.raises(InputError, match=flag):  # diffusers refuses these combinations too
            cls.from_config(SDXL, **{flag: True}).set_timesteps(timesteps=AYS_SDXL)
        with pytest.raises(ValueError):
            TORCH_CLASS[cls].from_config(SDXL, **{flag: True}).set_timesteps(timesteps=AYS_SDXL)


# --------------------------------------------------------------------------- trajectories

# DPM++ 2M SDE, 3M, 3M SDE, the heun solver, every re-spacing, both prediction types, and the
# lower-order switches where order 3 makes them act (7 and 9 steps: below diffusers' 15).
TRAJECTORY_CASES = [
    (MULTI, {"algorithm_type": "sde-dpmsolver++"}),
    (MULTI, {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True,
             "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    (MULTI, {"solver_order": 3}),
    (MULTI, {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    (MULTI, {"solver_order": 3, "solver_type": "heun", "use_exponential_sigmas": True,
             "prediction_type": "v_prediction", "timestep_spacing": "linspace"}),
    (MULTI, {"solver_type": "heun", "use_beta_sigmas": True, "timestep_spacing": "linspace"}),
    (MULTI, {"solver_order": 3, "lower_order_final": False}),
    (MULTI, {"solver_order": 3, "lower_order_final": False, "euler_at_final": True,
             "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    (MULTI, {"solver_order": 1, "algorithm_type": "sde-dpmsolver++", "use_exponential_sigmas": True}),
    (SINGLE, {}),
    (SINGLE, {"solver_type": "heun", "prediction_type": "v_prediction"}),
    (SINGLE, {"solver_order": 3}),
    (SINGLE, {"solver_order": 3, "solver_type": "heun", "use_karras_sigmas": True}),
    (SINGLE, {"solver_order": 3, "lower_order_final": True, "use_beta_sigmas": True,
              "prediction_type": "v_prediction"}),
    (SINGLE, {"solver_order": 1, "use_exponential_sigmas": True}),
    (SINGLE, {"use_beta_sigmas": True}),
    (SINGLE, {"algorithm_type": "sde-dpmsolver++"}),
    (SINGLE, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun",
              "prediction_type": "v_prediction"}),
]


@pytest.mark.parametrize("cls,changes", TRAJECTORY_CASES, ids=case_id)
def test_trajectory_matches_diffusers(cls, changes, noise_feed):
    # 4 / 7 / 9 / 20: odd and even counts, every remainder mod 3, and one past the 15-step threshold.
    trajectories(cls, changes, (4, 7, 9, 20), noise_feed)


def exhaustive_cases():
    for cls, alg, order, solver, respacing, prediction in itertools.product(
        (MULTI, SINGLE), ("dpmsolver++", "sde-dpmsolver++"), (1, 2, 3), ("midpoint", "heun"),
        RESPACINGS, ("epsilon", "v_prediction"),
    ):
        changes = {"algorithm_type": alg, "solver_order": order, "solver_type": solver,
                   "prediction_type": prediction, **RESPACINGS[respacing]}
        spacings = ("leading", "trailing", "linspace") if cls is MULTI else (None,)
        for spacing in spacings:
            yield cls, changes if spacing is None else {**changes, "timestep_spacing": spacing}


@pytest.mark.slow
@pytest.mark.parametrize("cls,changes", list(exhaustive_cases()), ids=case_id)
def test_trajectory_matches_diffusers_exhaustive(cls, changes, noise_feed):
    """Every combination, over many step counts; 1e-5 but for the higher orders on beta sigmas.

    Beta sigmas bunch the first steps (h -> 0 in log-SNR), where diffusers' float32 coefficients
    cancel: (exp(-h) - 1) / h + 1, and (exp(-h) - 1 + h) / h^2 - 0.5 most. There one ulp of
    torch's exp (SLEEF, not correctly rounded on ~1% of inputs) moves the result: at 25 steps of
    3S heun, diffusers' own float32 step is 2.9e-4 off the same formulas in float64. Independent
    random model outputs magnify it (their x0 estimates differ by ~100 from step to step at
    sigma 14, a denoiser's by far less). Order 1 on beta sigmas, and everything else, stays
    within 1e-5.
    """
    higher_order_beta = changes.get("use_beta_sigmas", False) and changes["solver_order"] > 1
    tol = 1e-4 if higher_order_beta else 1e-5
    trajectories(cls, changes, (1, 2, 3, 4, 5, 6, 7, 13, 14, 15, 16, 25), noise_feed, tol)


# Single-step order lists by start: 2S at index 9 is listed order 2 (lowered to 1 when starting
# there); 3S at 10 and 11 is listed 2 and 3.
MIDWAY_CASES = [
    (MULTI, {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, 9),
    (MULTI, {"solver_order": 3, "solver_type": "heun", "timestep_spacing": "trailing"}, 10),
    (SINGLE, {}, 9),
    (SINGLE, {"solver_order": 3}, 10),
    (SINGLE, {"solver_order": 3, "solver_type": "heun", "algorithm_type": "sde-dpmsolver++"}, 11),
]


@pytest.mark.parametrize("use_begin_index", [True, False], ids=["set_begin_index", "by_timestep"])
@pytest.mark.parametrize("cls,changes,k", MIDWAY_CASES, ids=case_id)
def test_img2img_start_midway(cls, changes, k, use_begin_index, noise_feed):
    """Noise an image latent to timesteps[k] and denoise from there, as img2img / the refiner do."""
    ours, theirs = pair(cls, **changes)
    set_both(ours, theirs, 25)
    if use_begin_index:
        ours.set_begin_index(k)
        theirs.set_begin_index(k)
    rng = np.random.default_rng(1)
    run_both(ours, theirs, k, rng, img2img_start(ours, theirs, k, rng), noise_feed)


@pytest.mark.parametrize("cls", [MULTI, SINGLE], ids=case_id)
def test_add_noise_per_item_timesteps(cls):
    ours, theirs = pair(cls, use_karras_sigmas=True)
    set_both(ours, theirs, 30)
    check_add_noise_per_item(ours, theirs, [3, 17], np.random.default_rng(2))


# --------------------------------------------------------------------------- runtime details


@pytest.mark.parametrize("cls", [MULTI, SINGLE], ids=case_id)
def test_sde_draws_noise_with_mx_random_when_none_given(cls):
    def run(seed, **changes):
        sched = cls.from_config(SDXL, **changes)
        sched.set_timesteps(4)
        mx.random.seed(seed)
        return np.array(sched.step(mx.zeros(SHAPE), sched.timesteps[0], mx.ones(SHAPE)).prev_sample)

    sde = {"algorithm_type": "sde-dpmsolver++"}
    assert np.array_equal(run(0, **sde), run(0, **sde)) and not np.array_equal(run(0, **sde), run(1, **sde))
    assert np.array_equal(run(0), run(1))  # the ODE form ignores the generator
    sched = cls.from_config(SDXL, **sde)
    sched.set_timesteps(4)
    with pytest.raises(InputError, match="noise has shape"):
        sched.step(mx.zeros(SHAPE), sched.timesteps[0], mx.ones(SHAPE), noise=mx.zeros((1, 8, 8, 4)))


@pytest.mark.parametrize("cls", [MULTI, SINGLE], ids=case_id)
def test_half_precision_sample_keeps_its_dtype(cls):
    sched = cls.from_config(SDXL, solver_order=3, algorithm_type="sde-dpmsolver++")
    sched.set_timesteps(5)
    x = mx.ones(SHAPE, dtype=mx.float16)
    for t in sched.timesteps:
        x = sched.step(mx.zeros(SHAPE, dtype=mx.float16), t, x, noise=mx.zeros(SHAPE)).prev_sample
        assert x.dtype == mx.float16


def test_singlestep_unknown_timestep_falls_back_to_last_step():
    ours, theirs = pair(SINGLE)
    set_both(ours, theirs, 10)
    assert ours.index_for_timestep(3) == theirs.index_for_timestep(3) == 9


# --------------------------------------------------------------------------- configs

REFUSED = [
    (MULTI, "solver_order", 4),
    (MULTI, "algorithm_type", "dpmsolver"),
    (MULTI, "algorithm_type", "sde-dpmsolver"),
    (MULTI, "algorithm_type", "deis"),
    (MULTI, "solver_type", "euler"),
    (MULTI, "thresholding", True),
    (MULTI, "use_lu_lambdas", True),
    (MULTI, "use_flow_sigmas", True),
    (MULTI, "use_dynamic_shifting", True),
    (MULTI, "final_sigmas_type", "sigma_min"),
    (MULTI, "variance_type", "learned_range"),
    (MULTI, "prediction_type", "sample"),
    (MULTI, "rescale_betas_zero_snr", True),
    (SINGLE, "solver_order", 4),
    (SINGLE, "algorithm_type", "dpmsolver"),
    (SINGLE, "thresholding", True),
    (SINGLE, "use_flow_sigmas", True),
    (SINGLE, "final_sigmas_type", "sigma_min"),
    (SINGLE, "variance_type", "learned"),
    (SINGLE, "prediction_type", "flow_prediction"),
    (SINGLE, "beta_schedule", "squaredcos_cap_v2"),
]


@pytest.mark.parametrize("cls,field,value", REFUSED, ids=case_id)
def test_unsupported_config_value_is_refused_by_name(cls, field, value):
    check_refused(cls, SDXL, field, value)


@pytest.mark.parametrize("cls", [MULTI, SINGLE], ids=case_id)
def test_config_quirks(cls):
    with pytest.raises(ConfigError, match="use_karras_sigmas, use_beta_sigmas"):
        cls.from_config(SDXL, use_karras_sigmas=True, use_beta_sigmas=True)
    # DEIS / UniPC solver names map to midpoint, as diffusers does.
    assert cls.from_config(SDXL, solver_type="bh2").config.solver_type == "midpoint"
    assert TORCH_CLASS[cls].from_config(SDXL, solver_type="bh2").config.solver_type == "midpoint"
    # Another scheduler's keys are read past (the multistep-only ones too, by the single-step class).
    cls.from_config({**SDXL, "clip_sample_range": 1.0, "original_inference_steps": 50})
    SINGLE.from_config(SDXL, use_lu_lambdas=True, euler_at_final=True)
    assert cls.from_config(SDXL).config.lower_order_final is TORCH_CLASS[cls]().config.lower_order_final
