"""Few-step models against diffusers' SDXL pipeline, on small random components, with the
schedulers configured as those models' authors ship or document them: SDXL-Turbo (ancestral
Euler, trailing, no guidance), SDXL-Lightning (Euler, trailing), Hyper-SD (DDIM, trailing), LCM
and LCM-LoRA, TCD, DMD2's fixed timesteps, Align-Your-Steps; and an LCM distillation's UNet,
which takes the guidance scale as an embedding instead of a second batch."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLPipeline,
    TCDScheduler,
)
from diffusers.schedulers import AysSchedules
from image_runs import PROMPT, compare_images, nchw, noise_latents
from pipeline_files import SIZE, converted_pipelines
from reference import (
    make_inputs,
    mlx_from_torch,
    relative_error,
    run_mlx,
    run_torch,
    tiny_config,
    torch_unet,
)

from mlx_unet import SDXLPipeline, cpu
from mlx_unet.convert import convert
from mlx_unet.models.embeddings import guidance_scale_embedding
from mlx_unet.models.unet import UNet2DConditionModel

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("torch_math_correctly_rounded")]
SEED = 21
LCM_WIDTH = 16  # time_cond_proj_dim of the tiny LCM UNets (256 in the published ones)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return converted_pipelines(tmp_path_factory.mktemp("few-step"))


def our_step_noises(seed: int, steps: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    """The per-step noise our sampler draws for a run of ``seed`` (pipelines.sampler: the seed's
    key split in two, the second split once per step)."""
    _, step_key = mx.random.split(mx.random.key(seed))
    keys = mx.random.split(step_key, steps)
    return [np.array(mx.random.normal(shape, key=keys[i])) for i in range(steps)]


def feed_noise(monkeypatch, scheduler, module, noises):
    """diffusers' scheduler draws, at each step, the noise ours drew at that step."""
    def draw(shape, *args, **kwargs):
        assert tuple(shape) == nchw(noises[0]).shape
        return nchw(noises[scheduler.step_index])

    monkeypatch.setattr(module, "randn_tensor", draw)


# (name, diffusers scheduler class and config changes, our sampler and overrides, steps, guidance)
CASES = {
    "turbo": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, "euler_a", 1, 0.0),
    "turbo-4": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, "euler_a", 4, 0.0),
    "lightning": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, "euler", 4, 0.0),
    "hyper-sd": (DDIMScheduler, {"timestep_spacing": "trailing"}, "ddim", 4, 0.0),
    "lcm-lora": (LCMScheduler, {}, "lcm", 4, 1.0),
    "lcm-cfg": (LCMScheduler, {}, "lcm", 2, 1.5),
    "tcd": (TCDScheduler, {}, "tcd", 4, 0.0),
}


@torch.no_grad()
@pytest.mark.parametrize("case", list(CASES))
def test_few_step_runs_match_diffusers(models, case, monkeypatch):
    their_class, changes, sampler, steps, guidance = CASES[case]
    theirs = models["base"]
    theirs.scheduler = their_class.from_config(theirs.scheduler.config, **changes)
    latents = noise_latents(1, seed=5)
    module = importlib.import_module(type(theirs.scheduler).__module__)
    if hasattr(module, "randn_tensor"):
        feed_noise(monkeypatch, theirs.scheduler, module, our_step_noises(SEED, steps, latents.shape))
    extra = {"eta": 0.3} if case == "tcd" else {}
    expected = theirs(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                      latents=nchw(latents), output_type="np", **extra).images
    pipe = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    scheduler = pipe.parts.make_scheduler(sampler, **changes)
    ours = pipe(PROMPT, steps=steps, guidance=guidance, height=SIZE, width=SIZE, seed=SEED,
                latents=mx.array(latents), scheduler=scheduler, output="float")
    compare_images(ours, expected)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["dmd2", "ays"])
def test_custom_timesteps_match_diffusers(models, kind, monkeypatch):
    """DMD2's four fixed timesteps under LCM; Align-Your-Steps' ten SDXL timesteps under DPM++ 2M."""
    theirs = models["base"]
    latents = noise_latents(1, seed=6)
    pipe = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    if kind == "dmd2":
        timesteps, guidance = [999, 749, 499, 249], 0.0
        theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config)
        from diffusers.schedulers import scheduling_lcm

        feed_noise(monkeypatch, theirs.scheduler, scheduling_lcm, our_step_noises(SEED, 4, latents.shape))
        scheduler = pipe.parts.make_scheduler("lcm")
        scheduler.custom_timesteps = lambda n: timesteps
        run = dict(scheduler=scheduler)
    else:
        timesteps, guidance = AysSchedules["StableDiffusionXLTimesteps"], 5.0
        theirs.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
        run = dict(scheduler="dpmpp_2m", sigmas="ays")
    expected = theirs(PROMPT, timesteps=timesteps, guidance_scale=guidance, height=SIZE, width=SIZE,
                      latents=nchw(latents), output_type="np").images
    ours = pipe(PROMPT, steps=len(timesteps), guidance=guidance, height=SIZE, width=SIZE, seed=SEED,
                latents=mx.array(latents), output="float", **run)
    compare_images(ours, expected)


# ---------------------------------------------------------------- an LCM distillation's UNet


def test_guidance_scale_embedding_matches_diffusers():
    for scale in (1.0, 2.5, 8.0):
        for width in (LCM_WIDTH, 17, 256):
            theirs = StableDiffusionXLPipeline.get_guidance_scale_embedding(
                None, torch.tensor([scale - 1.0]), embedding_dim=width)
            ours = guidance_scale_embedding(scale, width, 2)
            assert ours.shape == (2, width)
            # Angles of thousands of radians: an ulp of a frequency (torch's float32 exp against
            # ours) moves a phase by up to ~1e-3; nearly all values agree to float32 rounding.
            error = np.abs(np.array(ours[1]) - theirs[0].numpy())
            assert error.max() <= 1e-3 and np.mean(error <= 1e-6) >= 0.9, (scale, width, error.max())


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("family", ["sd15", "sdxl-base"])
def test_unet_with_guidance_embedding_matches_diffusers(family):
    config = tiny_config(family, time_cond_proj_dim=LCM_WIDTH)
    reference = torch_unet(config, seed=3)
    ours = mlx_from_torch(reference, config)
    inputs = make_inputs(config, 2, 16, 16, timesteps=[259.0, 759.0])
    cond = np.array(guidance_scale_embedding(6.0, LCM_WIDTH, 2))
    with torch.no_grad():
        expected = run_torch_with_cond(reference, inputs, cond)
    assert relative_error(np.array(run_mlx_with_cond(ours, inputs, cond)), expected) <= 1e-4
    # The condition matters: without it the output differs (diffusers' UNet then skips cond_proj).
    with torch.no_grad():
        plain = run_torch(reference, inputs)
    assert relative_error(run_mlx(ours, inputs), plain) <= 1e-4
    assert relative_error(plain, expected) > 1e-3
    # float16 weights and activations against the float32 reference, as the other UNet tests.
    half = mlx_from_torch(reference, config, dtype=mx.float16)
    got = run_mlx_with_cond(half, inputs, cond)
    assert got.dtype == cpu.computes_in(mx.float16) and relative_error(np.array(got.astype(mx.float32)), expected) <= 1e-2


def run_mlx_with_cond(model, inputs, cond):
    extra = {k: mx.array(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}
    return model(mx.array(inputs["sample"]), mx.array(inputs["timestep"]), mx.array(inputs["encoder_hidden_states"]),
                 timestep_cond=mx.array(cond), **extra)


def run_torch_with_cond(model, inputs, cond):
    kwargs = {}
    if "text_embeds" in inputs:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(inputs["text_embeds"]),
                                       "time_ids": torch.from_numpy(inputs["time_ids"])}
    out = model(torch.from_numpy(inputs["sample"]).permute(0, 3, 1, 2), torch.from_numpy(inputs["timestep"]),
                torch.from_numpy(inputs["encoder_hidden_states"]), timestep_cond=torch.from_numpy(cond),
                **kwargs).sample
    return out.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
@pytest.mark.usefixtures("code_path")  # the new UNet input on the CPU kernels and on plain MLX
def test_lcm_distilled_pipeline_matches_diffusers(models, tmp_path, monkeypatch):
    """An SDXL pipeline whose UNet takes the guidance scale (as latent-consistency/lcm-sdxl's):
    guidance 8 is one UNet pass a step, conditioned on the scale's embedding."""
    base = models["base"]
    unet = torch_unet(tiny_config("sdxl-base", time_cond_proj_dim=LCM_WIDTH), seed=71)
    theirs = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                       tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
                                       scheduler=LCMScheduler.from_config(base.scheduler.config))
    theirs.set_progress_bar_config(disable=True)
    theirs.save_pretrained(tmp_path / "diffusers")
    convert(tmp_path / "diffusers", tmp_path / "mlx", dtype="float32", progress=False)
    latents = noise_latents(1, seed=7)
    from diffusers.schedulers import scheduling_lcm

    feed_noise(monkeypatch, theirs.scheduler, scheduling_lcm, our_step_noises(SEED, 4, latents.shape))
    expected = theirs(PROMPT, num_inference_steps=4, guidance_scale=8.0, height=SIZE, width=SIZE,
                      latents=nchw(latents), output_type="np").images
    pipe = SDXLPipeline.from_pretrained(tmp_path / "mlx", dtype=mx.float32)
    assert pipe.parts.sampler_name() == "lcm"  # the shipped scheduler
    batches = []
    denoise = UNet2DConditionModel.denoise
    monkeypatch.setattr(UNet2DConditionModel, "denoise",
                        lambda self, sample, *a, **k: batches.append(sample.shape[0]) or denoise(self, sample, *a, **k))
    ours = pipe(PROMPT, steps=4, guidance=8.0, height=SIZE, width=SIZE, seed=SEED, latents=mx.array(latents),
                output="float")
    compare_images(ours, expected)
    assert batches == [1] * 4  # no negative batch


def test_guidance_zero_runs_one_unet_pass_a_step(models, monkeypatch):
    pipe = SDXLPipeline.from_pretrained(models["mlx"], dtype=mx.float32)
    batches = []
    denoise = UNet2DConditionModel.denoise
    monkeypatch.setattr(UNet2DConditionModel, "denoise",
                        lambda self, sample, *a, **k: batches.append(sample.shape[0]) or denoise(self, sample, *a, **k))
    pipe(PROMPT, steps=3, guidance=0.0, height=SIZE, width=SIZE, seed=1, output="latent")
    assert batches == [1, 1, 1]
    batches.clear()
    pipe(PROMPT, steps=2, guidance=5.0, height=SIZE, width=SIZE, seed=1, output="latent")
    assert batches == [2, 2]


@torch.no_grad()
def test_generate_runs_a_distilled_unet_file_on_its_base_model(models, tmp_path, capsys):
    """``--unet sdxl_lightning_2step_unet.safetensors``: a lone UNet in diffusers' layout (no
    config beside it) runs in place of --model's, converted with --model's config, on the
    Lightning schedule its name announces; the image is diffusers' with that UNet."""
    from safetensors.torch import save_file

    from mlx_unet import cli

    base = models["base"]
    distilled = torch_unet(tiny_config("sdxl-base"), seed=91)
    unet_file = tmp_path / "sdxl_lightning_2step_unet.safetensors"
    save_file({k: v.contiguous() for k, v in distilled.state_dict().items()}, str(unet_file))
    out = tmp_path / "l.png"
    assert cli.main(["generate", PROMPT, "--model", str(models["mlx"]), "--unet", str(unet_file), "--seed", "4",
                     "--height", str(SIZE), "--width", str(SIZE), "--dtype", "float32", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "converting the UNet" in err and "SDXL-Lightning 2-step: euler (trailing spacing), 2 steps" in err
    theirs = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                       tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=distilled,
                                       scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config,
                                                                                    timestep_spacing="trailing"))
    theirs.set_progress_bar_config(disable=True)
    latents = mx.random.normal((1, SIZE // 8, SIZE // 8, 4), key=mx.random.split(mx.random.key(4))[0])
    expected = theirs(PROMPT, num_inference_steps=2, guidance_scale=0.0, height=SIZE, width=SIZE,
                      latents=nchw(np.array(latents)), output_type="np").images
    from PIL import Image

    with Image.open(out) as image:
        ours = np.asarray(image).astype(np.float32) / 255
    assert np.abs(ours - expected[0]).max() <= 1.5 / 255  # a PNG: uint8 rounding either side
