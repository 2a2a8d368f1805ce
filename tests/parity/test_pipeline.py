"""The sampling loop against diffusers' own SDXL / SD pipelines, on small random components, from
the same prompt embeddings and initial noise, compared on the output latents."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img_module
from reference import mlx_from_torch, relative_error, tiny_config, torch_unet

from mlx_unet import UNet2DConditionModel
from mlx_unet.pipelines.sampler import Sampler
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG, make_scheduler

ROOT = Path(__file__).resolve().parents[2]
FP32 = 1e-4


def tiny_vae():
    # Only its four levels matter here (the 8x latent scale); outputs stay latents.
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4)


THEIR_SCHEDULERS = {
    "euler": lambda: EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
    "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler.from_config(
        SDXL_SCHEDULER_CONFIG, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
}


class Models:
    """One tiny model family on both sides: diffusers' UNet and ours with the same weights."""

    def __init__(self, family: str, seed: int):
        self.config = tiny_config(family)
        self.torch = torch_unet(self.config, seed=seed)
        self.ours = mlx_from_torch(self.torch, self.config)


@pytest.fixture(scope="module")
def base():
    return Models("sdxl-base", 60)


@pytest.fixture(scope="module")
def refiner():
    return Models("sdxl-refiner", 61)


def embeddings(config, seed, pooled=True, negative=False, n_time_ids=6):
    rng = np.random.default_rng(seed)
    out = {"prompt_embeds": rng.standard_normal((1, 9, config.cross_attention_dim), dtype=np.float32)}
    if pooled:
        width = config.projection_class_embeddings_input_dim - n_time_ids * config.addition_time_embed_dim
        out["pooled_prompt_embeds"] = rng.standard_normal((1, width), dtype=np.float32)
    if negative:
        out = {**out, **{f"negative_{k}": rng.standard_normal(v.shape, dtype=np.float32) for k, v in out.items()}}
    return out


def to_torch(arrays):
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def to_mlx(arrays):
    return {k: mx.array(v) for k, v in arrays.items()}


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def noise(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def sdxl_pipeline(models, scheduler, requires_aesthetics_score=False, cls=StableDiffusionXLPipeline):
    kwargs = {"requires_aesthetics_score": requires_aesthetics_score} if cls is StableDiffusionXLImg2ImgPipeline else {}
    return cls(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
               unet=models.torch, scheduler=scheduler, **kwargs)


@pytest.mark.parametrize("sampler", list(THEIR_SCHEDULERS))
@pytest.mark.parametrize("negative,rescale", [(False, 0.0), (True, 0.7)], ids=["zeros-negative", "negative+rescale"])
def test_sdxl_text_to_latents_matches_diffusers(base, sampler, negative, rescale):
    emb = embeddings(base.config, seed=1, negative=negative)
    start = noise((1, 16, 16, 4), seed=2)
    sizes = dict(original_size=(96, 160), crops_coords_top_left=(8, 16), target_size=(128, 128))
    if negative:
        sizes.update(negative_original_size=(64, 64), negative_target_size=(120, 112))
    with torch.no_grad():
        expected = sdxl_pipeline(base, THEIR_SCHEDULERS[sampler]())(
            **to_torch(emb), latents=nchw(start), num_inference_steps=7, guidance_scale=6.5,
            guidance_rescale=rescale, output_type="latent", **sizes).images
    ours = Sampler(base.ours, make_scheduler(sampler, SDXL_SCHEDULER_CONFIG))(
        **to_mlx(emb), latents=mx.array(start), num_inference_steps=7, guidance_scale=6.5,
        guidance_rescale=rescale, **sizes)
    assert relative_error(np.array(ours), nhwc(expected)) <= FP32


def test_without_guidance_runs_one_batch(base, monkeypatch):
    emb = embeddings(base.config, seed=3)
    start = noise((1, 16, 24, 4), seed=4)
    with torch.no_grad():
        expected = sdxl_pipeline(base, THEIR_SCHEDULERS["euler"]())(
            **to_torch(emb), latents=nchw(start), num_inference_steps=5, guidance_scale=1.0,
            height=128, width=192, output_type="latent").images
    calls = []
    denoise = UNet2DConditionModel.denoise
    monkeypatch.setattr(UNet2DConditionModel, "denoise",
                        lambda self, x, *a, **k: calls.append(x.shape) or denoise(self, x, *a, **k))
    sampler = Sampler(base.ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG), compile=False)
    ours = sampler(**to_mlx(emb), latents=mx.array(start), num_inference_steps=5, guidance_scale=1.0)
    assert calls == [(1, 16, 24, 4)] * 5
    assert relative_error(np.array(ours), nhwc(expected)) <= FP32


@pytest.mark.parametrize("low_memory", [False, True], ids=["batched", "low-memory"])
def test_text_keys_and_values_are_computed_once_per_run(base, monkeypatch, low_memory):
    """The cross-attention keys and values of the prompt are made once per run, not per step, and the
    run still matches diffusers (which makes them in every step), guided halves one by one too."""
    emb = embeddings(base.config, seed=11, negative=True)
    start = noise((1, 16, 16, 4), seed=12)
    with torch.no_grad():
        expected = sdxl_pipeline(base, THEIR_SCHEDULERS["euler"]())(
            **to_torch(emb), latents=nchw(start), num_inference_steps=4, guidance_scale=5.0,
            output_type="latent").images
    made, steps = [], []
    cross_attention_kv, denoise = UNet2DConditionModel.cross_attention_kv, UNet2DConditionModel.denoise
    monkeypatch.setattr(UNet2DConditionModel, "cross_attention_kv",
                        lambda self, context: made.append(context.shape) or cross_attention_kv(self, context))
    monkeypatch.setattr(UNet2DConditionModel, "denoise",
                        lambda self, x, *a, **k: steps.append(x.shape) or denoise(self, x, *a, **k))
    sampler = Sampler(base.ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG), compile=False, low_memory=low_memory)
    ours = sampler(**to_mlx(emb), latents=mx.array(start), num_inference_steps=4, guidance_scale=5.0)
    assert made == [(2, 9, base.config.cross_attention_dim)]
    assert steps == ([(1, 16, 16, 4)] * 8 if low_memory else [(2, 16, 16, 4)] * 4)
    assert relative_error(np.array(ours), nhwc(expected)) <= FP32


def test_img2img_strength_matches_diffusers(base, monkeypatch):
    emb = embeddings(base.config, seed=5)
    image, added = noise((1, 16, 16, 4), seed=6), noise((1, 16, 16, 4), seed=7)
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda *a, **k: nchw(added))
    with torch.no_grad():
        expected = sdxl_pipeline(base, THEIR_SCHEDULERS["euler"](), cls=StableDiffusionXLImg2ImgPipeline)(
            **to_torch(emb), image=nchw(image), strength=0.6, num_inference_steps=10, guidance_scale=5.0,
            output_type="latent").images
    ours = Sampler(base.ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG))(
        **to_mlx(emb), image_latents=mx.array(image), latents=mx.array(added), strength=0.6,
        num_inference_steps=10, guidance_scale=5.0)
    assert relative_error(np.array(ours), nhwc(expected)) <= FP32


def test_base_to_refiner_hand_off_matches_diffusers(base, refiner):
    base_emb = embeddings(base.config, seed=8)
    refiner_emb = embeddings(refiner.config, seed=9, n_time_ids=5)
    start = noise((1, 16, 16, 4), seed=10)
    with torch.no_grad():
        handed = sdxl_pipeline(base, THEIR_SCHEDULERS["euler"]())(
            **to_torch(base_emb), latents=nchw(start), num_inference_steps=10, denoising_end=0.75,
            output_type="latent").images
        expected = sdxl_pipeline(refiner, THEIR_SCHEDULERS["euler"](), requires_aesthetics_score=True,
                                 cls=StableDiffusionXLImg2ImgPipeline)(
            **to_torch(refiner_emb), image=handed, num_inference_steps=10, denoising_start=0.75,
            aesthetic_score=7.0, negative_aesthetic_score=2.0, output_type="latent").images
    our_handed = Sampler(base.ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG))(
        **to_mlx(base_emb), latents=mx.array(start), num_inference_steps=10, denoising_end=0.75)
    assert relative_error(np.array(our_handed), nhwc(handed)) <= FP32
    ours = Sampler(refiner.ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG))(
        **to_mlx(refiner_emb), image_latents=our_handed, num_inference_steps=10, denoising_start=0.75,
        aesthetic_score=7.0, negative_aesthetic_score=2.0)
    assert relative_error(np.array(ours), nhwc(expected)) <= FP32


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_sd_unets_without_added_conditioning(family):
    models = Models(family, 62)
    emb = embeddings(models.config, seed=11, pooled=False, negative=True)
    start = noise((1, 16, 16, 4), seed=12)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=models.torch,
                                   scheduler=THEIR_SCHEDULERS["dpmpp_2m_karras"](), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        expected = pipe(**to_torch(emb), latents=nchw(start), num_inference_steps=6, guidance_scale=7.5,
                        height=128, width=128, output_type="latent").images
    ours = Sampler(models.ours, make_scheduler("dpmpp_2m_karras", SDXL_SCHEDULER_CONFIG))(
        **to_mlx(emb), latents=mx.array(start), num_inference_steps=6, guidance_scale=7.5, height=128, width=128)
    assert relative_error(np.array(ours), nhwc(expected)) <= FP32


# SD 2.x 768-v: the UNet predicts v, the scheduler turns it into the denoised sample.
V_PREDICTION = {**SDXL_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
THEIR_V_SCHEDULERS = {
    "euler": lambda: EulerDiscreteScheduler.from_config(V_PREDICTION),
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(V_PREDICTION, algorithm_type="dpmsolver++", solver_order=2),
    "ddim": lambda: DDIMScheduler.from_config(V_PREDICTION),
}


@pytest.mark.parametrize("sampler", list(THEIR_V_SCHEDULERS))
def test_sd2_v_prediction_loop_matches_diffusers(sampler):
    """A whole SD 2.x v-prediction run (with guidance rescale, as 768-v models are run), not only
    the scheduler step: the UNet's output is read as v through the loop."""
    models = Models("sd2", 64)
    emb = embeddings(models.config, seed=15, pooled=False, negative=True)
    start = noise((1, 16, 16, 4), seed=16)
    scheduler = THEIR_V_SCHEDULERS[sampler]()
    assert scheduler.config.prediction_type == "v_prediction"
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=models.torch,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        expected = pipe(**to_torch(emb), latents=nchw(start), num_inference_steps=5,
                        guidance_scale=6.0, guidance_rescale=0.7, height=128, width=128, output_type="latent").images
    ours = Sampler(models.ours, make_scheduler(sampler, V_PREDICTION))(
        **to_mlx(emb), latents=mx.array(start), num_inference_steps=5, guidance_scale=6.0, guidance_rescale=0.7,
        height=128, width=128)
    assert relative_error(np.array(ours), nhwc(expected)) <= FP32


def test_steps_yield_progress_and_seeds_reproduce(base):
    emb = to_mlx(embeddings(base.config, seed=13))
    sampler = Sampler(base.ours, make_scheduler("euler_a", SDXL_SCHEDULER_CONFIG))
    steps = list(sampler.steps(**emb, num_inference_steps=4, seed=5))
    assert [s.index for s in steps] == [0, 1, 2, 3] and all(s.total == 4 and s.seconds > 0 for s in steps)
    again = sampler(**emb, num_inference_steps=4, seed=5)
    other = sampler(**emb, num_inference_steps=4, seed=6)
    assert mx.array_equal(steps[-1].latents, again)
    assert not mx.allclose(again, other)


def test_bad_arguments_are_explained(base):
    sampler = Sampler(base.ours, make_scheduler("euler", SDXL_SCHEDULER_CONFIG))
    emb = to_mlx(embeddings(base.config, seed=14))
    with pytest.raises(ValueError, match="needs pooled_prompt_embeds"):
        sampler(emb["prompt_embeds"], num_inference_steps=2)
    with pytest.raises(ValueError, match="multiple of 8"):
        sampler(**emb, num_inference_steps=2, height=100, width=128)
    with pytest.raises(ValueError, match="denoising_start needs image_latents"):
        sampler(**emb, num_inference_steps=2, denoising_start=0.5)
    with pytest.raises(ValueError, match="not SDXL's 6 \\(base\\) or 5 \\(refiner\\)"):
        sampler(emb["prompt_embeds"], emb["pooled_prompt_embeds"][:, :-3], num_inference_steps=2)


def test_sample_example_demo_runs(tmp_path):
    out = tmp_path / "latents.safetensors"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "sample.py"), "--demo", "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "s/step" in proc.stderr and f"wrote {out}" in proc.stderr
    latents = mx.load(str(out))["latents"]
    assert latents.shape == (1, 16, 16, 4) and bool(mx.all(mx.isfinite(latents)))


def test_sample_example_on_a_converted_model(tmp_path, base):
    """The documented path: convert.py's folder + an embeddings file -> sample.py -> latents."""
    from mlx_unet.convert import convert
    from safetensors.torch import save_file

    base.torch.save_pretrained(tmp_path / "unet")
    convert(tmp_path / "unet", tmp_path / "mlx", dtype="float32", progress=False)
    save_file(to_torch(embeddings(base.config, seed=15, negative=True)), str(tmp_path / "prompt.safetensors"))
    out = tmp_path / "latents.safetensors"
    args = [sys.executable, str(ROOT / "examples" / "sample.py"), "--model", str(tmp_path / "mlx"),
            "--embeddings", str(tmp_path / "prompt.safetensors"), "--steps", "3", "--size", "64", "96",
            "--scheduler", "dpmpp_2m_karras", "--dtype", "float32", "-o", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert mx.load(str(out))["latents"].shape == (1, 8, 12, 4)
    bad = subprocess.run(args[:5] + [str(tmp_path / "latents.safetensors"), "-o", str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "has no 'prompt_embeds' tensor" in bad.stderr and "Traceback" not in bad.stderr


def test_make_embeddings_example_has_help():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "make_embeddings.py"), "--help"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "encode" not in proc.stderr and "prompt" in proc.stdout
