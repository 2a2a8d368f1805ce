"""Samplers against diffusers' own schedulers, built from the same config dict in the same process.

Nothing here is a hard-coded number: every schedule, scaled input, step and noised latent is
compared with what diffusers computes for the same inputs. Ours run on NHWC arrays, diffusers'
on the NCHW transpose (the samplers are elementwise, but add_noise broadcasts per batch item).
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler as TorchDDIM,
    DPMSolverMultistepScheduler as TorchDPM,
    EulerAncestralDiscreteScheduler as TorchEulerA,
    EulerDiscreteScheduler as TorchEuler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from scheduler_runs import (SDXL, SHAPE, case_id, check_add_noise_per_item, check_refused, feed_noise,
                            img2img_start, nchw, nhwc, rel, run_both, run_trajectories, set_steps)

from mlx_unet.errors import ConfigError
from mlx_unet.schedulers.names import sampler_name
from mlx_unet.schedulers.sigmas import SIGMA_FLAGS
from mlx_unet.schedulers import (
    SAMPLERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    make_scheduler,
)

TORCH_CLASS = {
    EulerDiscreteScheduler: TorchEuler,
    EulerAncestralDiscreteScheduler: TorchEulerA,
    DPMSolverMultistepScheduler: TorchDPM,
    DDIMScheduler: TorchDDIM,
}
STEP_COUNTS = (1, 4, 25, 37, 50)
# The samplers this file covers; the others have files of their own (test_schedulers_*.py).
FIRST_SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim")

# diffusers' np.array(torch_tensor) calls trip a numpy 2 deprecation notice; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("torch_math_correctly_rounded")]


def pair(sampler, **changes):
    """(ours, diffusers') for a sampler name or class, from the SDXL config with ``changes``."""
    if isinstance(sampler, str):
        ours = make_scheduler(sampler, SDXL, **changes)
        name, sigmas = sampler_name(sampler)
        cls, implied = SAMPLERS[name]
        if sigmas is not None:
            implied = {**implied, SIGMA_FLAGS[sigmas]: True}
    else:
        cls, implied = sampler, {}
        ours = cls.from_config(SDXL, **changes)
    theirs = TORCH_CLASS[cls].from_config(SDXL, **implied, **changes)
    return ours, theirs


def run_first(ours, theirs, start, rng, sample, noise_feed):
    """run_both for this file's samplers: diffusers' DPM-Solver step returns no x0, its DDIM keeps
    no step index."""
    run_both(ours, theirs, start, rng, sample, noise_feed, check_x0=not isinstance(theirs, TorchDPM),
             check_step_index=not isinstance(theirs, TorchDDIM))


# --------------------------------------------------------------------------- schedules

SCHEDULE_CASES = [
    (sampler, spacing)
    for sampler in ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim")
    for spacing in ("leading", "trailing", "linspace")
] + [("euler", spacing + "+karras") for spacing in ("leading", "trailing", "linspace")]


@pytest.mark.parametrize("sampler,spacing", SCHEDULE_CASES)
def test_schedule_matches_diffusers(sampler, spacing):
    karras = spacing.endswith("+karras")
    changes = {"timestep_spacing": spacing.removesuffix("+karras")}
    if karras:
        changes["use_karras_sigmas"] = True
    for beta_schedule in ("scaled_linear", "linear"):
        ours, theirs = pair(sampler, beta_schedule=beta_schedule, **changes)
        assert ours.order == theirs.order
        # 61 "trailing" steps: diffusers' float arange yields 62 timesteps, the last one -1.
        for steps in STEP_COUNTS + (61,):
            set_steps(ours, theirs, steps)
            t_ours, t_theirs = np.array(ours.timesteps), theirs.timesteps.numpy()
            assert t_ours.shape == t_theirs.shape, (steps, t_ours, t_theirs)
            # Same kind: float32 for the Euler samplers, integers for DPM-Solver and DDIM.
            assert t_ours.dtype.kind == t_theirs.dtype.kind
            if t_ours.dtype.kind == "i":
                np.testing.assert_array_equal(t_ours, t_theirs)
            else:
                np.testing.assert_allclose(t_ours, t_theirs, rtol=1e-5, atol=0)
            if not isinstance(ours, DDIMScheduler):
                assert ours.sigmas.dtype == mx.float32
                np.testing.assert_allclose(np.array(ours.sigmas), theirs.sigmas.numpy(), rtol=1e-5, atol=0)
            assert isinstance(ours.init_noise_sigma, float)
            assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-5)


# lambda_min_clipped -2.5 cuts the last 31 training timesteps off SDXL's table (log-SNR below -2.5).
SCHEDULE_EXTRAS = [
    (DPMSolverMultistepScheduler, {"lambda_min_clipped": -2.5, "timestep_spacing": "linspace"}),
    (DPMSolverMultistepScheduler, {"lambda_min_clipped": -2.5, "timestep_spacing": "trailing"}),
    (EulerDiscreteScheduler, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    (EulerDiscreteScheduler, {"trained_betas": list(np.linspace(1e-4, 0.02, 1000) ** 1.5)}),
    (DDIMScheduler, {"trained_betas": list(np.linspace(1e-4, 0.02, 1000) ** 1.5), "prediction_type": "v_prediction"}),
]


@pytest.mark.parametrize("cls,changes", SCHEDULE_EXTRAS, ids=lambda v: case_id(v, bare=("trained_betas",)))
def test_schedule_options_match_diffusers(cls, changes):
    ours, theirs = pair(cls, **changes)
    for steps in (7, 30):
        set_steps(ours, theirs, steps)
        np.testing.assert_allclose(np.array(ours.timesteps), theirs.timesteps.numpy(), rtol=1e-5, atol=0)
        if hasattr(ours, "sigmas"):
            np.testing.assert_allclose(np.array(ours.sigmas), theirs.sigmas.numpy(), rtol=1e-5, atol=0)
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    t = ours.timesteps[2]
    out_ours = ours.step(mx.array(x), t, mx.array(x))
    out_theirs = theirs.step(nchw(x), theirs.timesteps[2], nchw(x))
    assert rel(out_ours.prev_sample, nhwc(out_theirs.prev_sample)) < 1e-5


def test_trailing_61_steps_reproduces_diffusers_extra_timestep():
    ours, _ = pair("euler", timestep_spacing="trailing")
    ours.set_timesteps(61)
    assert len(np.array(ours.timesteps)) == 62 and float(ours.timesteps[-1]) == -1.0


# --------------------------------------------------------------------------- trajectories

TRAJECTORY_CASES = [
    ("euler", {}),
    ("euler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("euler", {"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    ("euler_a", {}),
    ("euler_a", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m", {"prediction_type": "v_prediction", "timestep_spacing": "linspace"}),
    ("dpmpp_2m_karras", {}),
    ("dpmpp_2m_karras", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    (DPMSolverMultistepScheduler, {"solver_order": 1, "use_karras_sigmas": True}),
    # Inert with a final sigma of zero and order <= 2: accepted, and diffusers agrees.
    ("dpmpp_2m", {"lower_order_final": False, "euler_at_final": True}),
    ("ddim", {}),
    ("ddim", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("ddim", {"clip_sample": True, "set_alpha_to_one": True, "timestep_spacing": "linspace"}),
]


@pytest.fixture
def noise_feed(monkeypatch):
    return feed_noise(monkeypatch, scheduling_euler_ancestral_discrete)


@pytest.mark.parametrize("sampler,changes", TRAJECTORY_CASES, ids=case_id)
def test_trajectory_matches_diffusers(sampler, changes, noise_feed):
    # 20 steps >= 15: past diffusers' lower_order_final threshold for DPM-Solver.
    run_trajectories(*pair(sampler, **changes), (4, 20), run_first, noise_feed=noise_feed)


@pytest.mark.parametrize("use_begin_index", [True, False], ids=["set_begin_index", "by_timestep"])
@pytest.mark.parametrize("sampler", FIRST_SAMPLERS)
def test_img2img_start_midway(sampler, use_begin_index, noise_feed):
    """Noise an image latent to timesteps[k] and denoise from there, as img2img / the refiner do."""
    ours, theirs = pair(sampler)
    set_steps(ours, theirs, 25)
    k = 9
    if use_begin_index:
        ours.set_begin_index(k)
        if hasattr(theirs, "set_begin_index"):  # diffusers' DDIM has none (it needs none)
            theirs.set_begin_index(k)
    rng = np.random.default_rng(1)
    run_first(ours, theirs, k, rng, img2img_start(ours, theirs, k, rng), noise_feed)


@pytest.mark.parametrize("sampler", FIRST_SAMPLERS)
def test_add_noise_per_item_timesteps(sampler):
    ours, theirs = pair(sampler, timestep_spacing="trailing")
    set_steps(ours, theirs, 30)
    check_add_noise_per_item(ours, theirs, [3, 17], np.random.default_rng(2))


# --------------------------------------------------------------------------- step-index quirks


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_index_for_timestep_takes_the_second_of_duplicates(sampler):
    ours, theirs = pair(sampler)
    schedule = [999.0, 500.0, 500.0, 1.0] if sampler.startswith("euler") else [999, 500, 500, 1]
    ts_theirs = torch.tensor(schedule)
    for t in schedule:
        assert ours.index_for_timestep(t, np.array(schedule)) == theirs.index_for_timestep(t, ts_theirs)


def test_dpm_unknown_timestep_falls_back_to_last_step_but_euler_refuses():
    ours, theirs = pair("dpmpp_2m")
    set_steps(ours, theirs, 10)
    assert ours.index_for_timestep(3) == theirs.index_for_timestep(3) == 9
    euler, _ = pair("euler")
    euler.set_timesteps(10)
    with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
        euler.step(mx.zeros(SHAPE), 3.5, mx.zeros(SHAPE))


def test_euler_refuses_integer_timestep_like_diffusers():
    ours, _ = pair("euler")
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="integer timestep"):
        ours.step(mx.zeros(SHAPE), int(ours.timesteps[0].item()), mx.zeros(SHAPE))


def test_euler_ancestral_draws_noise_with_mx_random_when_none_given():
    def run(seed):
        sched = make_scheduler("euler_a", SDXL)
        sched.set_timesteps(4)
        mx.random.seed(seed)
        x = mx.ones(SHAPE)
        return np.array(sched.step(mx.zeros(SHAPE), sched.timesteps[0], x).prev_sample)

    assert np.array_equal(run(0), run(0)) and not np.array_equal(run(0), run(1))
    stochastic = {"euler_a", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm", "tcd"}
    assert [make_scheduler(name).stochastic for name in SAMPLERS] == [name in stochastic for name in SAMPLERS]


def test_half_precision_sample_keeps_its_dtype():
    sched = make_scheduler("dpmpp_2m_karras", SDXL)
    sched.set_timesteps(5)
    x = mx.ones(SHAPE, dtype=mx.float16)
    for t in sched.timesteps:
        x = sched.step(mx.zeros(SHAPE, dtype=mx.float16), t, x).prev_sample
        assert x.dtype == mx.float16


# --------------------------------------------------------------------------- configs


def test_make_scheduler_names_classes_and_settings():
    assert type(make_scheduler("euler", SDXL)) is EulerDiscreteScheduler
    assert type(make_scheduler("euler_a", SDXL)) is EulerAncestralDiscreteScheduler
    assert type(make_scheduler("ddim", SDXL)) is DDIMScheduler
    plain, karras = make_scheduler("dpmpp_2m", SDXL), make_scheduler("dpmpp_2m_karras", SDXL)
    assert not plain.config.use_karras_sigmas and karras.config.use_karras_sigmas
    assert plain.config.solver_order == 2 and plain.config.algorithm_type == "dpmsolver++"
    assert make_scheduler("euler", SDXL, timestep_spacing="trailing").config.timestep_spacing == "trailing"
    default, reference = make_scheduler("ddim"), TorchDDIM()  # no config: diffusers' defaults
    assert default.config.clip_sample and default.config.timestep_spacing == reference.config.timestep_spacing
    with pytest.raises(ValueError, match="solver_order"):
        make_scheduler("dpmpp_2m", SDXL, solver_order=3)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("heun_pp", SDXL)


def test_config_sources(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SDXL))
    pipeline = tmp_path / "pipe"
    (pipeline / "scheduler" / "empty").mkdir(parents=True)
    (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL))
    from_dict = EulerDiscreteScheduler.from_config(SDXL)
    for source in (tmp_path, tmp_path / "scheduler_config.json", str(tmp_path), pipeline, from_dict.config):
        assert EulerDiscreteScheduler.from_config(source).config == from_dict.config
    assert from_dict.config.num_train_timesteps == 1000 and from_dict.config.steps_offset == 1
    with pytest.raises(ConfigError, match="no scheduler_config.json"):
        EulerDiscreteScheduler.from_config(pipeline / "scheduler" / "empty")
    # Keys another scheduler wrote (SDXL's config carries PNDM/DDIM ones) are accepted everywhere.
    for sampler in SAMPLERS:
        make_scheduler(sampler, {**SDXL, "solver_order": 2, "clip_sample_range": 1.0, "original_inference_steps": 50})


REFUSED = [
    (EulerDiscreteScheduler, "rescale_betas_zero_snr", True),
    (EulerDiscreteScheduler, "timestep_type", "continuous"),
    (EulerDiscreteScheduler, "prediction_type", "sample"),
    (EulerDiscreteScheduler, "interpolation_type", "log_linear"),
    (EulerDiscreteScheduler, "final_sigmas_type", "sigma_min"),
    (EulerDiscreteScheduler, "beta_schedule", "squaredcos_cap_v2"),
    (EulerDiscreteScheduler, "timestep_spacing", "uniform"),
    (EulerDiscreteScheduler, "some_new_option", 3),
    (EulerAncestralDiscreteScheduler, "prediction_type", "sample"),
    (EulerAncestralDiscreteScheduler, "rescale_betas_zero_snr", True),
    (DPMSolverMultistepScheduler, "solver_order", 4),
    (DPMSolverMultistepScheduler, "algorithm_type", "sde-dpmsolver"),
    (DPMSolverMultistepScheduler, "thresholding", True),
    (DPMSolverMultistepScheduler, "use_lu_lambdas", True),
    (DPMSolverMultistepScheduler, "final_sigmas_type", "sigma_min"),
    (DPMSolverMultistepScheduler, "variance_type", "learned_range"),
    (DDIMScheduler, "thresholding", True),
    (DDIMScheduler, "prediction_type", "sample"),
]


@pytest.mark.parametrize("cls,field,value", REFUSED, ids=case_id)
def test_unsupported_config_value_is_refused_by_name(cls, field, value):
    check_refused(cls, SDXL, field, value)
