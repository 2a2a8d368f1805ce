"""UniPC and DEIS against diffusers' own schedulers, built from the same config dict in the same process.

Every schedule, step and noised latent is compared with what diffusers computes for the same
inputs. Ours run on NHWC arrays, diffusers' on the NCHW transpose. diffusers returns no x0 for
these samplers: ours is checked against the model output diffusers' scheduler converted (UniPC in
x0 mode keeps it) or against x0 from diffusers' own alpha_t, sigma_t.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import DEISMultistepScheduler as TorchDEIS, UniPCMultistepScheduler as TorchUniPC
from scheduler_runs import (SDXL, SHAPE, case_id, check_add_noise_per_item, check_refused, img2img_start,
                            nchw, nhwc, rel, run_trajectories, set_steps)

from mlx_unet.schedulers.deis import DEISMultistepScheduler
from mlx_unet.schedulers.unipc import UniPCMultistepScheduler

# diffusers' np.array(torch_tensor) calls trip a numpy 2 deprecation notice; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("torch_math_correctly_rounded")]

TORCH_CLASS = {UniPCMultistepScheduler: TorchUniPC, DEISMultistepScheduler: TorchDEIS}
STEP_COUNTS = (4, 7, 20)  # 20 > 15: past DEIS's lower_order_final threshold
RESPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def pair(cls, base=SDXL, **changes):
    """(ours, diffusers') from ``base`` with ``changes``, as one config dict for both."""
    config = {**base, **changes}
    return cls.from_config(config), TORCH_CLASS[cls].from_config(config)


def diffusers_x0(theirs, model_output, sample, i):
    """The x0 estimate at step i, from diffusers' sigmas and its own alpha_t / sigma_t."""
    alpha, sigma = theirs._sigma_to_alpha_sigma_t(theirs.sigmas[i])
    if theirs.config.prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    return alpha * sample - sigma * model_output


# --------------------------------------------------------------------------- schedules

def slow_beyond(cases, fast):
    """``cases`` as pytest params, all but the indices in ``fast`` marked slow (exhaustive variants)."""
    return [
        pytest.param(*case, id=case_id(case[1]), marks=() if i in fast else pytest.mark.slow)
        for i, case in enumerate(cases)
    ]


# Every spacing x re-spacing x final sigma; the fast subset still covers each of them once.
SCHEDULE_CASES = [
    (cls, {"timestep_spacing": spacing, **({respacing: True} if respacing else {}), **final})
    for cls, finals in (
        (UniPCMultistepScheduler, ({}, {"final_sigmas_type": "sigma_min"})),
        (DEISMultistepScheduler, ({},)),
    )
    for spacing in ("leading", "trailing", "linspace")
    for respacing in (None,) + RESPACINGS
    for final in finals
]
FAST_SCHEDULES = {0, 3, 10, 12, 14, 23, 25, 27, 31, 32}


@pytest.mark.parametrize("cls,changes", slow_beyond(SCHEDULE_CASES, FAST_SCHEDULES))
def test_schedule_matches_diffusers(cls, changes):
    for beta_schedule in ("scaled_linear", "linear"):
        ours, theirs = pair(cls, beta_schedule=beta_schedule, **changes)
        assert ours.order == theirs.order and ours.init_noise_sigma == float(theirs.init_noise_sigma)
        assert not ours.stochastic
        # Before set_timesteps: the training timesteps and table, as diffusers.
        np.testing.assert_array_equal(np.array(ours.timesteps), theirs.timesteps.numpy())
        np.testing.assert_allclose(np.array(ours.sigmas), theirs.sigmas.numpy(), rtol=1e-5, atol=0)
        for steps in (1, 4, 7, 20, 61):
            set_steps(ours, theirs, steps)
            t_ours, t_theirs = np.array(ours.timesteps), theirs.timesteps.numpy()
            assert t_ours.dtype.kind == t_theirs.dtype.kind == "i"
            # Exponential and beta timesteps are truncated, not rounded: exact equality tells.
            np.testing.assert_array_equal(t_ours, t_theirs)
            assert ours.sigmas.dtype == mx.float32
            np.testing.assert_allclose(np.array(ours.sigmas), theirs.sigmas.numpy(), rtol=1e-5, atol=0)


def test_respaced_ends_come_from_config_even_for_deis():
    """UniPC takes sigma_min / sigma_max; DEIS has no such fields, but diffusers' re-spacing reads
    them off a config dict that carries them (written by another scheduler)."""
    ends = {"sigma_min": 0.3, "sigma_max": 9.0}
    for cls in (UniPCMultistepScheduler, DEISMultistepScheduler):
        for respacing in RESPACINGS:
            ours, theirs = pair(cls, **{respacing: True}, **ends)
            set_steps(ours, theirs, 9)
            assert float(theirs.sigmas[0]) == pytest.approx(9.0)  # the ends really act in diffusers
            np.testing.assert_array_equal(np.array(ours.timesteps), theirs.timesteps.numpy())
            np.testing.assert_allclose(np.array(ours.sigmas), theirs.sigmas.numpy(), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- trajectories


def run_both(ours, theirs, start, rng, sample):
    """Step both from index ``start`` to the end on the same model outputs; check each step."""
    x_ours, x_theirs = mx.array(sample), nchw(sample)
    for i in range(start, len(np.array(ours.timesteps))):
        t_ours, t_theirs = ours.timesteps[i], theirs.timesteps[i]
        in_ours, in_theirs = ours.scale_model_input(x_ours, t_ours), theirs.scale_model_input(x_theirs, t_theirs)
        assert in_ours is x_ours and rel(in_ours, nhwc(in_theirs)) < 1e-5  # both the identity
        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        out_ours = ours.step(mx.array(model_output), t_ours, x_ours)
        x0_theirs = diffusers_x0(theirs, nchw(model_output), x_theirs, i)
        out_theirs = theirs.step(nchw(model_output), t_theirs, x_theirs)
        assert rel(out_ours.prev_sample, nhwc(out_theirs.prev_sample)) < 1e-5, ("prev_sample", i)
        if getattr(theirs, "predict_x0", False):
            x0_theirs = theirs.model_outputs[-1]  # the x0 diffusers' UniPC itself interpolates
        assert out_ours.pred_original_sample.dtype == mx.float32
        assert rel(out_ours.pred_original_sample, nhwc(x0_theirs)) < 1e-5, ("x0", i)
        assert ours.step_index == theirs.step_index
        x_ours, x_theirs = out_ours.prev_sample, out_theirs.prev_sample
    assert np.isfinite(np.array(x_ours)).all()


V = {"prediction_type": "v_prediction"}
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
TRAJECTORY_CASES = [
    (UniPCMultistepScheduler, {}),
    (UniPCMultistepScheduler, {"solver_order": 1}),
    (UniPCMultistepScheduler, {"solver_order": 3}),
    (UniPCMultistepScheduler, {**V, "timestep_spacing": "trailing"}),
    (UniPCMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    (UniPCMultistepScheduler, {"use_exponential_sigmas": True, **V}),
    (UniPCMultistepScheduler, {"use_beta_sigmas": True, "solver_order": 3}),
    (UniPCMultistepScheduler, {"disable_corrector": [0, 2, 5]}),
    # DPM-Solver's solver name: diffusers' UniPC runs it as bh2, and so do we.
    (UniPCMultistepScheduler, {"solver_type": "midpoint", "solver_order": 3}),
    (UniPCMultistepScheduler, {**SIGMA_MIN, "solver_type": "bh1"}),
    (UniPCMultistepScheduler, {**SIGMA_MIN, "solver_type": "bh1", "solver_order": 3, **V}),
    (UniPCMultistepScheduler, {**SIGMA_MIN, "predict_x0": False}),
    (UniPCMultistepScheduler, {**SIGMA_MIN, "predict_x0": False, "solver_type": "bh1", "solver_order": 3, **V}),
    (UniPCMultistepScheduler, {**SIGMA_MIN, "use_karras_sigmas": True, "lower_order_final": False}),
    (UniPCMultistepScheduler, {**SIGMA_MIN, "solver_order": 3, "lower_order_final": False, "timestep_spacing": "trailing"}),
    (DEISMultistepScheduler, {}),
    (DEISMultistepScheduler, {"solver_order": 1}),
    (DEISMultistepScheduler, {"solver_order": 3}),
    (DEISMultistepScheduler, {"solver_order": 3, "lower_order_final": False, **V, "timestep_spacing": "trailing"}),
    (DEISMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    (DEISMultistepScheduler, {"use_exponential_sigmas": True, **V}),
    (DEISMultistepScheduler, {"solver_order": 3, "use_beta_sigmas": True}),
    # DPM-Solver's names: diffusers' DEIS maps them to deis / logrho.
    (DEISMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_type": "midpoint"}),
]
# Default, orders 1 and 3, v-prediction, re-spacings, the corrector switch, bh1, the noise form.
FAST_TRAJECTORIES = {0, 1, 2, 3, 4, 6, 7, 11, 12, 14, 15, 17, 18, 21}


@pytest.mark.parametrize("cls,changes", slow_beyond(TRAJECTORY_CASES, FAST_TRAJECTORIES))
def test_trajectory_matches_diffusers(cls, changes):
    run_trajectories(*pair(cls, **changes), STEP_COUNTS, run_both)


@pytest.mark.slow
@pytest.mark.parametrize("cls,changes", [
    (UniPCMultistepScheduler, {"solver_order": 3}),
    (UniPCMultistepScheduler, {**SIGMA_MIN, "solver_order": 3, "predict_x0": False, "lower_order_final": False}),
    (DEISMultistepScheduler, {"solver_order": 3}),
    (DEISMultistepScheduler, {"solver_order": 3, "use_beta_sigmas": True, "timestep_spacing": "trailing"}),
], ids=case_id)
def test_long_third_order_trajectory_matches_diffusers(cls, changes):
    """50 steps of order 3, where diffusers' float32 weights keep the fewest digits: only
    bit-identical sigmas (and log-SNRs) keep the runs together."""
    ours, theirs = pair(cls, **changes)
    set_steps(ours, theirs, 50)
    np.testing.assert_array_equal(np.array(ours.sigmas), theirs.sigmas.numpy())
    # Beta sigmas repeat timestep 999 at the start: begin at index 0 rather than look it up.
    ours.set_begin_index(0)
    theirs.set_begin_index(0)
    rng = np.random.default_rng(5)
    run_both(ours, theirs, 0, rng, rng.standard_normal(SHAPE).astype(np.float32))


IMG2IMG_CASES = [
    (UniPCMultistepScheduler, {}),
    (UniPCMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True}),
    (UniPCMultistepScheduler, {**SIGMA_MIN, "predict_x0": False, **V}),
    (DEISMultistepScheduler, {}),
    (DEISMultistepScheduler, {"solver_order": 3, "use_beta_sigmas": True}),
]


@pytest.mark.parametrize("use_begin_index", [True, False], ids=["set_begin_index", "by_timestep"])
@pytest.mark.parametrize("cls,changes", slow_beyond(IMG2IMG_CASES, {1, 2, 4}))
def test_img2img_start_midway(cls, changes, use_begin_index):
    """Noise an image latent to timesteps[k] and denoise from there: the solvers warm up again."""
    ours, theirs = pair(cls, **changes)
    set_steps(ours, theirs, 25)
    k = 9
    if use_begin_index:
        ours.set_begin_index(k)
        theirs.set_begin_index(k)
    rng = np.random.default_rng(1)
    run_both(ours, theirs, k, rng, img2img_start(ours, theirs, k, rng))


@pytest.mark.parametrize("cls", list(TORCH_CLASS))
def test_add_noise_per_item_timesteps(cls):
    ours, theirs = pair(cls, timestep_spacing="trailing")
    set_steps(ours, theirs, 30)
    check_add_noise_per_item(ours, theirs, [3, 17], np.random.default_rng(2))


@pytest.mark.parametrize("cls", list(TORCH_CLASS))
def test_unknown_timestep_falls_back_to_last_step(cls):
    ours, theirs = pair(cls)
    set_steps(ours, theirs, 10)
    assert ours.index_for_timestep(3) == theirs.index_for_timestep(3) == 9


@pytest.mark.parametrize("cls", list(TORCH_CLASS))
def test_half_precision_sample_keeps_its_dtype(cls):
    sched = cls.from_config(SDXL, solver_order=3)
    sched.set_timesteps(5)
    x = mx.ones(SHAPE, dtype=mx.float16)
    for t in sched.timesteps:
        x = sched.step(mx.full(SHAPE, 0.1, dtype=mx.float16), t, x).prev_sample
        assert x.dtype == mx.float16
    assert np.isfinite(np.array(x)).all()


# --------------------------------------------------------------------------- configs


def test_diffusers_defaults_and_foreign_keys():
    for cls in TORCH_CLASS:
        ours, theirs = cls.from_config({}), TORCH_CLASS[cls]()
        for name in ("solver_order", "timestep_spacing", "lower_order_final", "beta_schedule", "solver_type"):
            assert getattr(ours.config, name) == theirs.config[name]
        # Keys other schedulers write are read past, as diffusers' from_config does.
        cls.from_config({**SDXL, "clip_sample_range": 1.0, "euler_at_final": False, "rho": 7.0})
    assert UniPCMultistepScheduler.from_config(SDXL, disable_corrector=None).config.disable_corrector == ()
    assert UniPCMultistepScheduler.from_config(SDXL, solver_type="logrho").config.solver_type == "bh2"
    assert DEISMultistepScheduler.from_config(SDXL, solver_type="bh2").config.solver_type == "logrho"


REFUSED = [
    (UniPCMultistepScheduler, {"solver_order": 4}, "solver_order", 4),
    (UniPCMultistepScheduler, {"solver_type": "heun2"}, "solver_type", "heun2"),
    (UniPCMultistepScheduler, {"thresholding": True}, "thresholding", True),
    (UniPCMultistepScheduler, {"use_flow_sigmas": True}, "use_flow_sigmas", True),
    (UniPCMultistepScheduler, {"use_dynamic_shifting": True}, "use_dynamic_shifting", True),
    (UniPCMultistepScheduler, {"shift_terminal": 0.1}, "shift_terminal", 0.1),
    (UniPCMultistepScheduler, {"final_sigmas_type": "sigma_max"}, "final_sigmas_type", "sigma_max"),
    (UniPCMultistepScheduler, {"disable_corrector": [1, "2"]}, "disable_corrector", [1, "2"]),
    (UniPCMultistepScheduler, {"prediction_type": "flow_prediction"}, "prediction_type", "flow_prediction"),
    (UniPCMultistepScheduler, {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr", True),
    (UniPCMultistepScheduler, {"sigma_min": -1.0}, "sigma_min", -1.0),
    # Not finite in diffusers with a final sigma of zero.
    (UniPCMultistepScheduler, {"solver_type": "bh1"}, "solver_type", "bh1"),
    (UniPCMultistepScheduler, {"predict_x0": False}, "predict_x0", False),
    (UniPCMultistepScheduler, {"lower_order_final": False}, "lower_order_final", False),
    (UniPCMultistepScheduler, {**SIGMA_MIN, "solver_order": 3, "lower_order_final": False, "use_beta_sigmas": True},
     "lower_order_final", False),
    (DEISMultistepScheduler, {"solver_order": 4}, "solver_order", 4),
    (DEISMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type", "sde-dpmsolver++"),
    (DEISMultistepScheduler, {"solver_type": "rk4"}, "solver_type", "rk4"),
    (DEISMultistepScheduler, {"thresholding": True}, "thresholding", True),
    (DEISMultistepScheduler, {"use_flow_sigmas": True}, "use_flow_sigmas", True),
    (DEISMultistepScheduler, {"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule", "squaredcos_cap_v2"),
    (DEISMultistepScheduler, {"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_beta_sigmas", None),
    (DEISMultistepScheduler, {"some_new_option": 3}, "some_new_option", 3),
]


@pytest.mark.parametrize("cls,changes,field,value", REFUSED, ids=case_id)
def test_unsupported_config_value_is_refused_by_name(cls, changes, field, value):
    # Unquoted: a message may list the fields it refuses together ("use_karras_sigmas, use_beta_sigmas").
    check_refused(cls, SDXL, field, value, changes, quoted=False)


def test_refused_final_zero_combinations_are_not_finite_in_diffusers():
    """The refusals above are diffusers' own NaN / inf, not a gap: check that they still are."""
    for changes in ({"solver_type": "bh1"}, {"predict_x0": False}, {"lower_order_final": False}):
        theirs = TorchUniPC.from_config({**SDXL, **changes})
        theirs.set_timesteps(5)
        rng = np.random.default_rng(4)
        x = torch.from_numpy(rng.standard_normal((1, 4, 2, 2)).astype(np.float32))
        for t in theirs.timesteps:
            x = theirs.step(torch.from_numpy(rng.standard_normal((1, 4, 2, 2)).astype(np.float32)), t, x).prev_sample
        assert not torch.isfinite(x).all(), changes
        # ... and with the last sigma of the table instead of zero they run, here as there.
        UniPCMultistepScheduler.from_config(SDXL, **changes, **SIGMA_MIN)
