"""Class 3: non-finite and out-of-range numbers are refused up front (before a model loads), or
named when they appear in weights and latents."""

from __future__ import annotations

import math
import shutil
import time
import warnings

import mlx.core as mx
import numpy as np
import pytest
from bad_input_helpers import PROMPT, RUN, SIZE, assert_user_error, run_cli, run_in_process, tree_digest
from mlx.utils import tree_flatten

from mlx_unet import InputError, Sampler, SDXLPipeline, UNet2DConditionModel, UNetConfig, make_scheduler
from mlx_unet.errors import NonFiniteWarning
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG

# (option, value, what the one-line message must name)
BAD_OPTIONS = [
    ("--guidance", "inf", "--guidance must be a finite number"),
    ("--guidance", "nan", "--guidance must be a finite number"),
    ("--guidance", "-1", "--guidance must be a finite number from 0 to 100"),
    ("--guidance", "1e6", "--guidance must be a finite number from 0 to 100"),
    ("--seed", "-1", "--seed must be an integer from 0 to 2**64 - 1"),
    ("--seed", str(2**64), "--seed must be an integer from 0 to 2**64 - 1"),
    ("--steps", "0", "--steps must be an integer from 1 to 1000"),
    ("--steps", "100000", "--steps must be an integer from 1 to 1000"),
    ("--steps", "2.5", "invalid int value: '2.5'"),
    ("--height", "0", "--height must be a positive multiple of 8"),
    ("--height", "-64", "--height must be a positive multiple of 8"),
    ("--width", "60", "--width must be a positive multiple of 8"),
    ("--width", "64.0", "invalid int value: '64.0'"),
    ("--batch-size", "0", "--batch-size must be an integer at least 1"),
    ("--refiner-start", "nan", "--refiner-start must be a finite number above 0 and at most 1"),
    ("--refiner-start", "1", "--refiner-start must be below 1"),
]


# The fast tier: one value per message; the other values of a message (its other bound, nan
# beside inf) run in the slow tier.
SECOND_OF_A_MESSAGE = {"--guidance=nan", "--guidance=1e6", f"--seed={2**64}", "--steps=100000", "--height=-64",
                       "--width=64.0"}


@pytest.mark.parametrize("option, value, message", [
    pytest.param(o, v, m, id=f"{o}={v}", marks=pytest.mark.slow if f"{o}={v}" in SECOND_OF_A_MESSAGE else ())
    for o, v, m in BAD_OPTIONS])
def test_bad_numbers_are_refused_before_loading(tiny_pipeline, tmp_path, option, value, message):
    before = tree_digest(tiny_pipeline)
    refiner = ["--refiner", str(tiny_pipeline)] if option == "--refiner-start" else []
    began = time.perf_counter()
    proc = run_in_process("generate", PROMPT, "--model", str(tiny_pipeline), "-o", str(tmp_path / "out.png"), *RUN,
                          *refiner, option, value)
    assert_user_error(proc, message)
    assert time.perf_counter() - began < 20  # refused at start-up, not after a run
    assert list(tmp_path.iterdir()) == [] and tree_digest(tiny_pipeline) == before


def test_a_prompt_that_is_not_utf8_is_refused(tiny_pipeline, tmp_path):
    import subprocess
    import sys

    from bad_input_helpers import ROOT

    proc = subprocess.run([sys.executable, "-m", "mlx_unet", "generate", b"a \xff\xfe lighthouse", "--model",
                           str(tiny_pipeline), "-o", str(tmp_path / "out.png"), *RUN], capture_output=True, cwd=ROOT)
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    assert_user_error(proc, "not UTF-8 text")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return SDXLPipeline.from_pretrained(tiny_pipeline, dtype=mx.float32)


API_RUN = dict(steps=2, height=SIZE, width=SIZE, seed=1)
BAD_CALLS = [
    (dict(guidance=math.inf), "guidance must be a finite number"),
    (dict(guidance=math.nan), "guidance must be a finite number"),
    (dict(guidance_rescale=2.0), "guidance_rescale must be a finite number from 0 to 1"),
    (dict(seed=-1), "seed must be an integer from 0 to 2\\*\\*64 - 1"),
    (dict(seed=2**64), "seed must be an integer from 0 to 2\\*\\*64 - 1"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(steps=0), "steps must be an integer from 1 to 1000"),
    (dict(steps=True), "steps must be an integer"),
    (dict(steps=10**9), "steps must be an integer from 1 to 1000"),
    (dict(height=0), "height must be a positive multiple of 8"),
    (dict(width=64.0), "width must be a positive multiple of 8"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer at least 1"),
    (dict(clip_skip=99), "clip_skip must be an integer from 0 to 2"),
    (dict(output="png"), "output must be 'uint8', 'float' or 'latent'"),
    (dict(release_unet="yes"), "release_unet must be True or False, not 'yes'"),
    (dict(widen_weights="yes"), "widen_weights must be True, False or None \\(where it pays\\), not 'yes'"),
    (dict(latents=mx.full((1, 8, 8, 4), mx.nan)), "latents holds NaN or infinite values"),
    (dict(image=np.full((1, SIZE, SIZE, 3), np.nan, np.float32), strength=1.0), "image holds NaN or infinite values"),
    (dict(image=np.full((1, SIZE, SIZE, 3), 2.0, np.float32), strength=1.0), "image holds values outside \\[0, 1\\]"),
    (dict(image=np.zeros((1, SIZE, SIZE, 3), np.uint8), strength=0.01, steps=30),
     "strength 0.01 of 30 steps leaves no step to run; raise steps to at least 100 or strength to at least 0.0333"),
    (dict(image=np.zeros((1, SIZE, SIZE, 3), np.uint8), strength=0.0), "strength must be a finite number above 0"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CALLS, ids=[",".join(k) + f"-{i}" for i, (k, _) in enumerate(BAD_CALLS)])
def test_bad_api_arguments_are_refused_before_any_work(pipe, kwargs, message, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the prompt was encoded before the arguments were checked")

    monkeypatch.setattr(pipe, "encode_prompt", no_work)
    with pytest.raises(InputError, match=message):
        pipe(PROMPT, **{**API_RUN, **kwargs})


def test_a_refiner_hand_off_that_leaves_a_model_no_step_is_refused(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("encoded before the check"))
    # SDXL's 2-step schedule is timesteps 501, 1: a hand-off at 0.1 (timestep 900) leaves the base none.
    with pytest.raises(InputError, match="leaves the base model no step; raise steps or refiner_start"):
        pipe(PROMPT, steps=2, height=SIZE, width=SIZE, refiner=pipe, refiner_start=0.1)


def test_sampler_refuses_non_finite_inputs():
    config = UNetConfig.from_preset("tiny")
    sampler = Sampler(UNet2DConditionModel(config), make_scheduler("euler", SDXL_SCHEDULER_CONFIG))
    context = mx.zeros((1, 77, config.cross_attention_dim))
    pooled = mx.zeros((1, 40))
    with pytest.raises(InputError, match="prompt_embeds holds NaN"):
        sampler.steps(context * mx.nan, pooled, num_inference_steps=2, height=SIZE, width=SIZE)
    with pytest.raises(InputError, match="num_inference_steps must be an integer from 1 to 1000"):
        sampler.steps(context, pooled, num_inference_steps=0)
    with pytest.raises(InputError, match="guidance_scale must be a finite number"):
        sampler.steps(context, pooled, guidance_scale=math.nan)


def _nan_copy(tiny_pipeline, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(tiny_pipeline, folder)
    weights = folder / "unet" / "model.safetensors"
    tensors = dict(mx.load(str(weights)))
    tensors["conv_in.bias"] = mx.full(tensors["conv_in.bias"].shape, mx.nan)
    mx.save_safetensors(str(weights), tensors)
    return folder


def test_nan_weights_and_latents_are_named_once(tiny_pipeline, tmp_path):
    folder = _nan_copy(tiny_pipeline, tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = SDXLPipeline.from_pretrained(folder, dtype=mx.float32)
        pipe(PROMPT, **API_RUN, output="latent")
    messages = [str(w.message) for w in seen if issubclass(w.category, NonFiniteWarning)]
    assert any("conv_in.bias" in m and "NaN" in m for m in messages), messages  # the weights, at load
    steps = [m for m in messages if m.startswith("step ")]
    assert len(steps) == 1 and steps[0].startswith("step 1 of 2 made NaN or infinite latents"), messages
    # The command says so too, under --quiet, as one line per warning; the run still ends normally.
    proc = run_cli("generate", PROMPT, "--model", str(folder), "-o", str(tmp_path / "out.png"), *RUN)
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert proc.returncode == 0 and len(warned) == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_finite_weights_warn_nothing(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        pipe(PROMPT, **API_RUN, output="latent")
    assert all(mx.all(mx.isfinite(v)).item() for _, v in tree_flatten(pipe.unet.parameters()))
