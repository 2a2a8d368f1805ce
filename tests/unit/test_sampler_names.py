"""Sampler and sigma-schedule names as people write them, Align-Your-Steps' stretching, and the
run defaults of few-step models, read from their names and shipped configs."""

import numpy as np
import pytest

from mlx_unet.configs.unet import UNetConfig
from mlx_unet.errors import InputError
from mlx_unet.pipelines import few_step
from mlx_unet.pipelines.folder import PipelineFolder
from mlx_unet.pipelines.parameters import sampler_of
from mlx_unet.schedulers import SAMPLERS, make_scheduler, shipped_sampler, sigma_schedules
from mlx_unet.schedulers.base import alphas_cumprod, sigma_table
from mlx_unet.schedulers.ddim import DDIMConfig
from mlx_unet.schedulers.names import WEB_UI_SAMPLERS, sampler_name, web_ui_name
from mlx_unet.schedulers.sigmas import AYS_TIMESTEPS, ays_timesteps

SDXL = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
        "timestep_spacing": "leading"}

NAMES = [
    # ours
    ("dpmpp_2m", ("dpmpp_2m", None)),
    ("dpmpp_2m_karras", ("dpmpp_2m", "karras")),
    # the web UI's, up to 1.8 with the schedule in the name
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
    ("DPM++ 2M SDE Exponential", ("dpmpp_2m_sde", "exponential")),
    ("DPM++ 3M SDE", ("dpmpp_3m_sde", None)),
    ("Euler a", ("euler_a", None)),
    ("LMS Karras", ("lms", "karras")),
    ("PLMS", ("pndm", None)),
    ("UniPC", ("unipc", None)),
    ("Heun", ("heun", None)),
    # ComfyUI's
    ("euler_ancestral", ("euler_a", None)),
    ("uni_pc_bh2", ("unipc", None)),
    ("dpmpp_2m_sde", ("dpmpp_2m_sde", None)),
    ("lcm", ("lcm", None)),
    ("dpmpp_2m align your steps", ("dpmpp_2m", "ays")),
]


@pytest.mark.parametrize("name,expected", NAMES, ids=[n for n, _ in NAMES])
def test_names_people_write_resolve_to_ours(name, expected):
    assert sampler_name(name) == expected


@pytest.mark.parametrize("name", ["DPM++ 2S a", "dpmpp_2s_ancestral", "euler_max", "karras", ""])
def test_unknown_or_missing_samplers_are_refused_in_one_sentence(name):
    with pytest.raises(InputError, match="sampler") as e:
        sampler_name(name)
    assert "\n" not in str(e.value)


def test_web_ui_parameters_round_trip():
    for sampler in SAMPLERS:
        for sigmas in sigma_schedules(sampler):
            web_sampler, schedule = web_ui_name(sampler, sigmas)
            fields = {"Sampler": web_sampler, **({"Schedule type": schedule} if schedule else {})}
            assert sampler_of(fields) == (sampler, None if sigmas == "default" else sigmas)
    assert sampler_of({"Sampler": "DPM++ 2M Karras"}) == ("dpmpp_2m", "karras")  # web UI <= 1.8
    assert sampler_of({"Sampler": "Euler a", "Schedule type": "Automatic"}) == ("euler_a", None)
    assert set(WEB_UI_SAMPLERS) == set(SAMPLERS)


def test_every_sampler_is_made_from_every_shipped_config():
    """A model's config may come from any scheduler class; each of ours takes each."""
    shipped = [make_scheduler(name, SDXL) for name in SAMPLERS]
    for source in shipped:
        config = {**vars(source.config), "_class_name": type(source).__name__}
        for name in SAMPLERS:
            scheduler = make_scheduler(name, config)
            scheduler.set_timesteps(6)
            assert len(np.array(scheduler.timesteps)) >= 6


@pytest.mark.parametrize("config,expected", [
    ({"_class_name": "EulerDiscreteScheduler"}, "euler"),
    ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_a"),
    ({"_class_name": "PNDMScheduler"}, "pndm"),
    ({"_class_name": "LCMScheduler"}, "lcm"),
    ({"_class_name": "TCDScheduler"}, "tcd"),
    ({"_class_name": "UniPCMultistepScheduler"}, "unipc"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "dpmpp_2m"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "dpmpp_3m"),
    ({"_class_name": "DPMSolverSinglestepScheduler"}, "dpmpp_2s"),
    ({"_class_name": "KDPM2DiscreteScheduler"}, "euler"),
    (None, "euler"),
])
def test_the_shipped_sampler(config, expected):
    assert shipped_sampler(config) == expected


def test_sigma_schedules_are_offered_where_the_sampler_takes_them():
    assert sigma_schedules("dpmpp_2m") == ("default", "karras", "exponential", "beta", "ays")
    assert sigma_schedules("euler") == ("default", "karras", "exponential", "beta", "ays")
    assert sigma_schedules("euler_a") == ("default",)
    assert sigma_schedules("ddim") == ("default",)
    with pytest.raises(InputError, match="cannot run on the karras sigma schedule"):
        make_scheduler("euler_a", SDXL, sigmas="karras")
    with pytest.raises(InputError, match="means the karras sigma schedule"):
        make_scheduler("DPM++ 2M Karras", SDXL, sigmas="exponential")
    with pytest.raises(InputError, match="family"):
        make_scheduler("euler", SDXL, sigmas="ays")
    # A shipped re-spacing is switched off by another one, and by "default".
    karras_config = {**SDXL, "use_karras_sigmas": True}
    assert make_scheduler("dpmpp_2m", karras_config).config.use_karras_sigmas
    exponential = make_scheduler("dpmpp_2m", karras_config, sigmas="exponential").config
    assert exponential.use_exponential_sigmas and not exponential.use_karras_sigmas
    assert not make_scheduler("dpmpp_2m", karras_config, sigmas="default").config.use_karras_sigmas


def test_align_your_steps_is_the_published_list_at_ten_steps_and_stretched_otherwise():
    table = sigma_table(alphas_cumprod(DDIMConfig(**SDXL)))
    for family, published in AYS_TIMESTEPS.items():
        assert ays_timesteps(family, 10, table) == list(published)
        for steps in (4, 7, 20, 30):
            stretched = ays_timesteps(family, steps, table)
            assert len(stretched) == steps and stretched[0] == published[0] and stretched[-1] == published[-1]
            assert all(a > b for a, b in zip(stretched, stretched[1:]))
        # The stretch keeps the published points where they fall on the new grid (every other of 19).
        assert ays_timesteps(family, 19, table)[::2] == list(published)
    scheduler = make_scheduler("euler", SDXL, sigmas="ays", family="sdxl")
    assert scheduler.custom_timesteps(10) == list(AYS_TIMESTEPS["sdxl"])
    with pytest.raises(InputError, match="sd and sdxl"):
        ays_timesteps("sd3", 10, table)


# ------------------------------------------------------------------ few-step defaults


def folder(scheduler=None, **unet_changes) -> PipelineFolder:
    unet = UNetConfig.from_preset("tiny", **unet_changes)
    return PipelineFolder(path=None, index={}, unet=unet, vae=None, encoders=(None, None), scheduler=scheduler)


@pytest.mark.parametrize("names,label,steps,guidance,sampler,spacing", [
    (["sdxl-turbo"], "Turbo", 1, 0.0, "euler_a", "trailing"),
    (["stable-diffusion-xl-base-1.0", "sdxl_lightning_4step_lora"], "SDXL-Lightning 4-step", 4, 0.0, "euler",
     "trailing"),
    (["sdxl_lightning_8step_unet"], "SDXL-Lightning 8-step", 8, 0.0, "euler", "trailing"),
    (["base", "Hyper-SDXL-8steps-lora"], "Hyper-SD 8-step", 8, 0.0, "ddim", "trailing"),
    (["base", "Hyper-SDXL-12steps-CFG-lora"], "Hyper-SD 12-step", 12, 5.0, "ddim", "trailing"),
    (["base", "Hyper-SDXL-1step-Unet"], "Hyper-SD 1-step", 1, 0.0, "lcm", None),
    (["base", "lcm-lora-sdxl"], "LCM", 4, 1.0, "lcm", None),
    (["base", "TCD-SDXL-LoRA"], "TCD", 4, 0.0, "tcd", None),
    (["base", "dmd2_sdxl_4step_lora_fp16"], "DMD2 4-step", 4, 0.0, "lcm", None),
])
def test_few_step_models_are_told_by_their_names(names, label, steps, guidance, sampler, spacing):
    defaults = few_step.run_defaults(folder(), names)
    assert (defaults.label, defaults.steps, defaults.guidance, defaults.sampler) == (label, steps, guidance, sampler)
    assert defaults.scheduler_config.get("timestep_spacing") == spacing
    assert defaults.size == (512 if label == "Turbo" else None)


def test_few_step_models_are_told_by_what_they_ship():
    assert few_step.run_defaults(folder(), ["stable-diffusion-xl-base-1.0", "pixel-art-xl"]) is few_step.ORDINARY
    assert few_step.run_defaults(folder({"_class_name": "TCDScheduler"}), ["x"]).sampler == "tcd"
    lcm = few_step.run_defaults(folder({"_class_name": "LCMScheduler"}), ["LCM_Dreamshaper_v7"])
    assert (lcm.sampler, lcm.guidance) == ("lcm", 1.0)
    # A UNet that takes the guidance scale: guidance 8 costs nothing (no second batch).
    distilled = few_step.run_defaults(folder(time_cond_proj_dim=16), ["some-model"])
    assert (distilled.sampler, distilled.steps, distilled.guidance) == ("lcm", 4, 8.0)
    # Words that merely contain a name do not count.
    assert few_step.run_defaults(folder(), ["blcmx"]) is few_step.ORDINARY
