"""Euler (with its sigma re-spacings and custom timesteps), Heun and LMS against diffusers' own
schedulers, built from the same config dict in the same process.

Nothing here is a hard-coded number: every schedule, scaled input, step, LMS weight and noised
latent is compared with what diffusers computes for the same inputs. Ours run on NHWC arrays,
diffusers' on the NCHW transpose (the samplers are elementwise, but add_noise broadcasts per
batch item).
"""

import inspect

import mlx.core as mx
import numpy as np
import pytest
from diffusers import (
    EulerAncestralDiscreteScheduler as TorchEulerA,
    EulerDiscreteScheduler as TorchEuler,
    HeunDiscreteScheduler as TorchHeun,
    LMSDiscreteScheduler as TorchLMS,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from scheduler_runs import (AYS_SDXL, SDXL, SHAPE, case_id, check_add_noise_per_item, check_refused,
                            feed_noise, img2img_start, rel, run_both, run_trajectories)

from mlx_unet.errors import ConfigError
from mlx_unet.schedulers.euler import EulerDiscreteScheduler
from mlx_unet.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from mlx_unet.schedulers.heun import HeunDiscreteScheduler
from mlx_unet.schedulers.lms import LMSDiscreteScheduler, lms_coefficients

# diffusers' np.array(torch_tensor) calls trip a numpy 2 deprecation notice; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("torch_math_correctly_rounded")]

TORCH_CLASS = {
    EulerDiscreteScheduler: TorchEuler,
    EulerAncestralDiscreteScheduler: TorchEulerA,
    HeunDiscreteScheduler: TorchHeun,
    LMSDiscreteScheduler: TorchLMS,
}
CLASSES = [EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler]
RESPACINGS = [None, "karras", "exponential", "beta"]
FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
SPACINGS = ["leading", "trailing", "linspace"]


def respacing(kind):
    """Config changes that turn re-spacing ``kind`` on (None: the plain spacing)."""
    return {} if kind is None else {FLAGS[kind]: True}


def pair(cls, **changes):
    """(ours, diffusers') for ``cls``, from the SDXL config with ``changes``."""
    return cls.from_config(SDXL, **changes), TORCH_CLASS[cls].from_config({**SDXL, **changes})


def check_schedule(ours, theirs):
    t_ours, t_theirs = np.array(ours.timesteps), theirs.timesteps.numpy()
    assert t_ours.shape == t_theirs.shape, (t_ours, t_theirs)
    assert t_ours.dtype == np.float32 and t_theirs.dtype == np.float32
    np.testing.assert_allclose(t_ours, t_theirs, rtol=1e-5, atol=1e-4)
    assert ours.sigmas.dtype == mx.float32
    np.testing.assert_allclose(np.array(ours.sigmas), theirs.sigmas.numpy(), rtol=1e-5, atol=0)
    assert isinstance(ours.init_noise_sigma, float)
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-5)
    assert ours.num_inference_steps == theirs.num_inference_steps
    assert ours.order == theirs.order


def set_both(ours, theirs, steps=None, timesteps=None):
    if timesteps is None:
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
    else:
        ours.set_timesteps(timesteps=timesteps)
        theirs.set_timesteps(timesteps=timesteps)
    check_schedule(ours, theirs)


@pytest.fixture
def noise_feed(monkeypatch):
    return feed_noise(monkeypatch, scheduling_euler_ancestral_discrete)


# --------------------------------------------------------------------------- schedules


def schedule_case(c, cls, k, kind, spacing):
    # Every class meets every re-spacing and every spacing in the fast rotation; the rest of the
    # cross product is the exhaustive variant.
    fast = spacing == SPACINGS[(c + k) % len(SPACINGS)]
    return pytest.param(cls, kind, spacing, id=f"{cls.__name__}-{kind}-{spacing}", marks=() if fast else pytest.mark.slow)


SCHEDULE_CASES = [
    schedule_case(c, cls, k, kind, spacing)
    for c, cls in enumerate(CLASSES)
    for k, kind in enumerate(RESPACINGS)
    for spacing in SPACINGS
]


@pytest.mark.parametrize("cls,kind,spacing", SCHEDULE_CASES)
def test_schedule_matches_diffusers(cls, kind, spacing):
    ours, theirs = pair(cls, timestep_spacing=spacing, **respacing(kind))
    check_schedule(ours, theirs)  # before set_timesteps: Heun and LMS set num_train_timesteps steps
    # 61 "trailing" steps: diffusers' float arange yields 62 timesteps, the last one -1.
    for steps in (1, 4, 7, 20, 61):
        set_both(ours, theirs, steps)


# sigma_min / sigma_max: Euler's config fields. Heun and LMS have no such parameters, but
# diffusers keeps a config's extra keys and their re-spacings read them (LMS's Karras does not).
ENDS = {"sigma_min": 0.1, "sigma_max": 10.0}
ENDS_CASES = [(cls, kind) for cls in CLASSES for kind in RESPACINGS[1:]]


@pytest.mark.parametrize("cls,kind", ENDS_CASES, ids=case_id)
def test_configured_sigma_ends_as_diffusers(cls, kind):
    ours, theirs = pair(cls, **ENDS, **respacing(kind))
    plain = cls.from_config(SDXL, **respacing(kind))
    for steps in (4, 7):
        set_both(ours, theirs, steps)
        plain.set_timesteps(steps)
        honoured = not (cls is LMSDiscreteScheduler and kind == "karras")
        assert (float(ours.sigmas[0]) == pytest.approx(10.0)) == honoured
        assert np.array_equal(np.array(ours.sigmas), np.array(plain.sigmas)) != honoured


SCHEDULE_EXTRAS = [
    (cls, changes)
    for cls in CLASSES
    for changes in (
        {"beta_schedule": "linear", "timestep_spacing": "trailing"},
        {"trained_betas": list(np.linspace(1e-4, 0.02, 1000) ** 1.5), "use_karras_sigmas": True},
        {"steps_offset": 0, "use_exponential_sigmas": True},
    )
] + [
    # Heun and LMS have no rescale_betas_zero_snr: diffusers keeps the key and never reads it.
    (HeunDiscreteScheduler, {"rescale_betas_zero_snr": True}),
    (LMSDiscreteScheduler, {"rescale_betas_zero_snr": True}),
]


@pytest.mark.parametrize("cls,changes", SCHEDULE_EXTRAS, ids=lambda v: case_id(v).replace("trained_betas=", "trained")[:60])
def test_schedule_options_match_diffusers(cls, changes):
    ours, theirs = pair(cls, **changes)
    for steps in (7, 30):
        set_both(ours, theirs, steps)


def test_heun_interleaves_timesteps_and_sigmas():
    ours, _ = pair(HeunDiscreteScheduler, timestep_spacing="trailing")
    euler, _ = pair(EulerDiscreteScheduler, timestep_spacing="trailing")
    ours.set_timesteps(5)
    euler.set_timesteps(5)
    t, s = np.array(euler.timesteps), np.array(euler.sigmas)
    assert len(np.array(ours.timesteps)) == 2 * 5 - 1 and ours.num_inference_steps == 5
    np.testing.assert_array_equal(np.array(ours.timesteps), np.concatenate([t[:1], np.repeat(t[1:], 2)]))
    np.testing.assert_array_equal(np.array(ours.sigmas), np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]]))


# --------------------------------------------------------------------------- LMS weights


@pytest.mark.parametrize("changes", [{}, {"use_karras_sigmas": True, "timestep_spacing": "trailing"}], ids=case_id)
def test_lms_weights_match_diffusers_numerical_integration(changes):
    """Exact integrals of the Lagrange basis against diffusers' scipy quad, on diffusers' sigmas."""
    ours, theirs = pair(LMSDiscreteScheduler, **changes)
    for steps in (4, 7, 20):
        set_both(ours, theirs, steps)
        for order in (1, 2, 3, 4):
            weights = lms_coefficients(theirs.sigmas.numpy(), order)
            assert len(weights) == steps
            for i in range(steps):
                m = min(i + 1, order)
                reference = np.array([theirs.get_lms_coefficient(m, i, j) for j in range(m)])
                assert len(weights[i]) == m
                assert rel(weights[i], reference) < 1e-6, (steps, order, i)


# --------------------------------------------------------------------------- trajectories

TRAJECTORY_CASES = [
    (cls, changes)
    for cls in CLASSES
    for changes in (
        {},
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"use_karras_sigmas": True, "timestep_spacing": "linspace"},
        {"use_exponential_sigmas": True, "prediction_type": "v_prediction"},
        {"use_beta_sigmas": True, "timestep_spacing": "trailing"},
    )
] + [
    (HeunDiscreteScheduler, {"clip_sample": True, "clip_sample_range": 0.5, "prediction_type": "v_prediction"}),
]


@pytest.mark.parametrize("cls,changes", TRAJECTORY_CASES, ids=case_id)
def test_trajectory_matches_diffusers(cls, changes):
    run_trajectories(*pair(cls, **changes), (4, 7, 20), set_both=set_both)


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind", RESPACINGS, ids=str)
@pytest.mark.parametrize("cls", CLASSES, ids=case_id)
def test_trajectory_matches_diffusers_exhaustive(cls, kind, spacing, prediction):
    ours, theirs = pair(cls, timestep_spacing=spacing, prediction_type=prediction, **respacing(kind))
    run_trajectories(ours, theirs, (1, 4, 7, 20, 61), set_both=set_both)


@pytest.mark.parametrize("lms_order", [1, 2, 3])
def test_lms_order_setting_is_diffusers_step_order(lms_order):
    ours = LMSDiscreteScheduler.from_config(SDXL, lms_order=lms_order)
    theirs = TorchLMS.from_config(SDXL)
    assert ours.lms_order == lms_order and ours.order == theirs.order == 1
    run_trajectories(ours, theirs, (4, 7), set_both=set_both, order=lms_order)


def test_euler_ancestral_still_matches_diffusers(noise_feed):
    ours, theirs = pair(EulerAncestralDiscreteScheduler, prediction_type="v_prediction")
    run_trajectories(ours, theirs, (7,), set_both=set_both, seed=5, noise_feed=noise_feed)


# --------------------------------------------------------------------------- custom timesteps

@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, HeunDiscreteScheduler], ids=case_id)
@pytest.mark.parametrize("custom", [AYS_SDXL, [999.0, 700.5, 400.25, 80.0, 3.0]], ids=["ays_sdxl", "fractional"])
def test_custom_timesteps_match_diffusers(cls, custom):
    ours, theirs = pair(cls, prediction_type="v_prediction")
    set_both(ours, theirs, timesteps=custom)
    rng = np.random.default_rng(4)
    sample = rng.standard_normal(SHAPE).astype(np.float32) * ours.init_noise_sigma
    run_both(ours, theirs, 0, rng, sample)
    # An mx.array works too; so does starting over with a step count.
    ours.set_timesteps(timesteps=mx.array(custom))
    np.testing.assert_allclose(np.array(ours.timesteps), theirs.timesteps.numpy(), rtol=1e-6)
    set_both(ours, theirs, 5)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, HeunDiscreteScheduler], ids=case_id)
@pytest.mark.parametrize("kind", RESPACINGS[1:])
def test_custom_timesteps_refused_with_respacing_as_diffusers(cls, kind):
    ours, theirs = pair(cls, **respacing(kind))
    with pytest.raises(ValueError):
        theirs.set_timesteps(timesteps=AYS_SDXL)
    with pytest.raises(ValueError, match=FLAGS[kind]):
        ours.set_timesteps(timesteps=AYS_SDXL)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, HeunDiscreteScheduler], ids=case_id)
def test_set_timesteps_takes_one_of_steps_or_timesteps(cls):
    ours, theirs = pair(cls)
    for kwargs in ({"num_inference_steps": 10, "timesteps": AYS_SDXL}, {}):
        with pytest.raises(ValueError):
            theirs.set_timesteps(**kwargs)
        with pytest.raises(ValueError, match="num_inference_steps"):
            ours.set_timesteps(**kwargs)
    for bad in ([], [[999, 500]], [999, float("nan")], ["late", "early"]):
        with pytest.raises(ValueError, match="custom timesteps"):
            ours.set_timesteps(timesteps=bad)


@pytest.mark.parametrize("cls", list(TORCH_CLASS), ids=case_id)
def test_takes_timesteps_as_diffusers(cls):
    """What tells make_scheduler which samplers can run Align-Your-Steps."""
    assert cls.takes_timesteps == ("timesteps" in inspect.signature(TORCH_CLASS[cls].set_timesteps).parameters)


@pytest.mark.parametrize("cls", [EulerAncestralDiscreteScheduler, LMSDiscreteScheduler], ids=case_id)
def test_custom_timesteps_refused_where_diffusers_has_none(cls):
    ours, theirs = pair(cls)
    with pytest.raises(TypeError):
        theirs.set_timesteps(timesteps=AYS_SDXL)
    with pytest.raises(TypeError):
        ours.set_timesteps(timesteps=AYS_SDXL)


# --------------------------------------------------------------------------- img2img


def img2img_begin(cls, steps, strength):
    """Where a pipeline starts img2img: diffusers' get_timesteps."""
    init_steps = min(int(steps * strength), steps)
    return (steps - init_steps) * cls.order


IMG2IMG_CASES = [
    (cls, changes)
    for cls in (HeunDiscreteScheduler, LMSDiscreteScheduler, EulerDiscreteScheduler)
    for changes in ({}, {"use_karras_sigmas": True, "prediction_type": "v_prediction"})
]


@pytest.mark.parametrize("use_begin_index", [True, False], ids=["set_begin_index", "by_timestep"])
@pytest.mark.parametrize("cls,changes", IMG2IMG_CASES, ids=case_id)
def test_img2img_start_midway(cls, changes, use_begin_index):
    """Noise an image latent to the start timestep and denoise from there, as img2img does.

    Heun's start is an even index (the first evaluation of a step); found by timestep, the
    second of its two equal entries is taken, which is that same index.
    """
    ours, theirs = pair(cls, **changes)
    set_both(ours, theirs, 25)
    k = img2img_begin(cls, 25, 0.6)
    assert k == 10 * cls.order
    if use_begin_index:
        ours.set_begin_index(k)
        theirs.set_begin_index(k)
    rng = np.random.default_rng(1)
    run_both(ours, theirs, k, rng, img2img_start(ours, theirs, k, rng))


@pytest.mark.parametrize("cls", CLASSES, ids=case_id)
def test_add_noise_per_item_timesteps(cls):
    ours, theirs = pair(cls, timestep_spacing="trailing")
    set_both(ours, theirs, 30)
    check_add_noise_per_item(ours, theirs, [4, 17], np.random.default_rng(2))


# --------------------------------------------------------------------------- dtypes, noise


@pytest.mark.parametrize("cls", [HeunDiscreteScheduler, LMSDiscreteScheduler], ids=case_id)
def test_half_precision_sample_keeps_its_dtype_and_no_noise_is_drawn(cls):
    sched = cls.from_config(SDXL)
    sched.set_timesteps(4)
    assert not sched.stochastic
    x = mx.ones(SHAPE, dtype=mx.float16)
    for t in sched.timesteps:
        out = sched.step(mx.zeros(SHAPE, dtype=mx.float16), t, sched.scale_model_input(x, t))
        x = out.prev_sample
        assert x.dtype == mx.float16 and out.pred_original_sample.dtype == mx.float32


# --------------------------------------------------------------------------- configs

REFUSED = [
    (EulerDiscreteScheduler, "timestep_type", "continuous"),
    (EulerDiscreteScheduler, "final_sigmas_type", "sigma_min"),
    (EulerDiscreteScheduler, "sigma_min", -1.0),
    (EulerDiscreteScheduler, "use_beta_sigmas", "yes"),
    (EulerAncestralDiscreteScheduler, "rescale_betas_zero_snr", True),
    (HeunDiscreteScheduler, "prediction_type", "sample"),
    (HeunDiscreteScheduler, "beta_schedule", "exp"),
    (HeunDiscreteScheduler, "beta_schedule", "squaredcos_cap_v2"),
    (HeunDiscreteScheduler, "timestep_spacing", "uniform"),
    (HeunDiscreteScheduler, "clip_sample_range", "wide"),
    (HeunDiscreteScheduler, "sigma_max", 0),
    (HeunDiscreteScheduler, "some_new_option", 3),
    (LMSDiscreteScheduler, "prediction_type", "sample"),
    (LMSDiscreteScheduler, "beta_schedule", "squaredcos_cap_v2"),
    (LMSDiscreteScheduler, "use_karras_sigmas", 1),
    (LMSDiscreteScheduler, "steps_offset", -1),
]


@pytest.mark.parametrize("cls,field,value", REFUSED, ids=case_id)
def test_unsupported_config_value_is_refused_by_name(cls, field, value):
    check_refused(cls, SDXL, field, value)


@pytest.mark.parametrize("cls", CLASSES, ids=case_id)
def test_two_respacings_at_once_are_refused_as_diffusers(cls):
    changes = {"use_karras_sigmas": True, "use_beta_sigmas": True}
    with pytest.raises(ValueError):
        TORCH_CLASS[cls].from_config({**SDXL, **changes})
    with pytest.raises(ConfigError, match="use_karras_sigmas.*use_beta_sigmas"):
        cls.from_config(SDXL, **changes)


def test_euler_ancestral_ignores_the_respacing_flags_as_diffusers():
    """Its diffusers class has none: a config's flags are read past, the sigmas stay evenly spaced."""
    ours, theirs = pair(EulerAncestralDiscreteScheduler, use_karras_sigmas=True, use_beta_sigmas=False)
    set_both(ours, theirs, 9)
    plain, _ = pair(EulerAncestralDiscreteScheduler)
    plain.set_timesteps(9)
    np.testing.assert_array_equal(np.array(ours.sigmas), np.array(plain.sigmas))


def test_lms_order_setting_is_checked():
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="lms_order"):
            LMSDiscreteScheduler.from_config(SDXL, lms_order=bad)
