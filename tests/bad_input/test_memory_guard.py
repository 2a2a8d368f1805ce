"""A run that cannot fit in memory is refused before anything is allocated, in one sentence that
says what would fit; and the estimate behind that bounds what runs really take."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import mlx.core as mx
import pytest
from bad_input_helpers import PROMPT, ROOT, assert_user_error, run_cli

from mlx_unet import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)
from mlx_unet.cpu import ENV_SWITCH
from mlx_unet.errors import InputError
from mlx_unet.pipelines import memory, model_sizes
from mlx_unet.pipelines.folder import PipelineFolder
from mlx_unet.weights import model_shapes

RUN = {"images": 1, "guided": True, "dtype": mx.float16, "vae_dtype": mx.float32, "tiled_vae": False,
       "low_memory": False}


def _configs(folder):
    parts = PipelineFolder.read(folder)
    return parts.unet, parts.vae, [e for e in parts.encoders if e is not None]


def _sdxl():
    return (UNetConfig.from_preset("sdxl-base"), VAEConfig.from_preset("sdxl"),
            [CLIPTextConfig.from_preset("sdxl-clip-l"), CLIPTextConfig.from_preset("sdxl-clip-bigg")])


@pytest.mark.parametrize("build, config", [
    (UNet2DConditionModel, UNetConfig.from_preset("tiny")), (UNet2DConditionModel, UNetConfig.from_preset("sd2")),
    (UNet2DConditionModel, UNetConfig.from_preset("sdxl-refiner")), (AutoencoderKL, VAEConfig.from_preset("sdxl")),
    (CLIPTextModel, CLIPTextConfig.from_preset("sdxl-clip-bigg")), (CLIPTextModel, CLIPTextConfig.from_preset("sdxl-clip-l")),
], ids=["unet-tiny", "unet-sd2", "unet-refiner", "vae-sdxl", "clip-bigg", "clip-l"])
def test_parameter_counts_from_configs_match_the_models(build, config):
    counts = {UNet2DConditionModel: model_sizes.unet_parameters, AutoencoderKL: model_sizes.vae_parameters,
              CLIPTextModel: model_sizes.text_encoder_parameters}
    assert counts[build](config) == sum(math.prod(s) for s in model_shapes(build(config)).values())


@pytest.mark.parametrize("kernels", ["1", pytest.param("0", marks=pytest.mark.slow)],
                         ids=["cpu-kernels", "plain-mlx"])
def test_estimate_bounds_measured_peak(tiny_pipeline, kernels):
    """Measured in a fresh process per code path (the path is chosen when models load): the
    prompt + denoising loop and the decode of 2 guided images at 64 and 256 px. The estimate may
    exceed twice the measurement by its fixed allowances only (the chunked attention's, on the
    kernels' path, and each stage's small arrays), which dominate at these small sizes."""
    env = {**os.environ, ENV_SWITCH: kernels}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory_estimate.py"), "tiny", "--model",
                          str(tiny_pipeline), "--sizes", "64", "256", "--quick", "--json"],
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = json.loads(out)
    assert len(rows) == 4
    fixed = memory.STAGE_ALLOWANCE + (memory.CHUNKED_ATTENTION if kernels == "1" else 0)
    for row in rows:
        assert row["path"] == ("CPU kernels" if kernels == "1" else "plain MLX")
        assert row["measured"] <= row["estimate"] <= 2 * row["measured"] + fixed, row


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "plain-mlx"])
def test_estimate_grows_with_size_and_batch_and_shrinks_with_tiling_and_low_memory(kernels, monkeypatch):
    unet, vae, encoders = _sdxl()

    def peak(size=1024, stage=None, **change):
        run = RUN | {"cpu_kernels": kernels} | change
        estimate = memory.estimate_run(unet, vae, encoders, height=size, width=size, **run)
        return estimate.peak if stage is None else estimate.stages[stage]

    sizes = [peak(s) for s in (512, 1024, 2048, 4096)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert peak(images=1) < peak(images=2) < peak(images=4)
    assert peak(stage="denoise", guided=False) < peak(stage="denoise")
    assert peak(4096, tiled_vae=True) < peak(4096)
    # SDXL's VAE tiles at its sample_size (1024 px) by default: one tile for a 1024 px image;
    # --tile-vae's 256 px tiles are what make the decode smaller there.
    assert memory.command_tile(vae) == 256 and vae.sample_size == 1024
    assert peak(stage="decode", tiled_vae=True) == peak(stage="decode")
    assert peak(stage="decode", tiled_vae=True, vae_tile=256) < 0.5 * peak(stage="decode")
    assert peak(4096, "denoise", low_memory=True, images=2) < peak(4096, "denoise", images=2)
    assert peak(4096, low_memory=True, tiled_vae=True) < peak(4096, tiled_vae=True)
    unet_weights = model_sizes.unet_bytes(unet, mx.float16.size, None)
    assert peak(stage="decode", release_unet=True) == peak(stage="decode") - unet_weights
    assert peak(stage="denoise", release_unet=True) == peak(stage="denoise")
    refiner = UNetConfig.from_preset("sdxl-refiner")
    refined, released = (memory.estimate_run(unet, vae, encoders, height=1024, width=1024, refiner=refiner,
                                             **RUN | {"cpu_kernels": kernels, "release_unet": release})
                         for release in (False, True))
    assert refined.peak > peak() and "refine" in refined.stages
    # Released at the end of its stage, the base UNet is not held while the refiner's runs.
    assert released.stages["refine"] == refined.stages["refine"] - unet_weights
    assert released.stages["denoise"] == refined.stages["denoise"]


def test_plain_path_counts_the_whole_attention_matrix():
    unet, vae, encoders = _sdxl()
    stages = {k: memory.estimate_run(unet, vae, encoders, height=4096, width=4096, cpu_kernels=k, **RUN).stages
              for k in (True, False)}
    # The VAE's mid-block attention over 512 x 512 latent pixels: 2**36 float32 scores, 256 GiB.
    assert stages[False]["decode"] - stages[True]["decode"] > 256 * memory.GIB


def test_refusal_names_estimate_budget_and_a_size_that_fits(tiny_pipeline, monkeypatch):
    monkeypatch.setenv(memory.BUDGET_ENV, "8")
    configs = _configs(tiny_pipeline)
    # On the CPU kernels' path, whatever MLX_UNET_CPU_KERNELS says: its chunked attention is what
    # lets a tiled 8192 px run fit in 8 GiB.
    run = RUN | {"dtype": mx.float16, "vae_dtype": mx.float16, "cpu_kernels": True}
    with pytest.raises(InputError) as caught:
        memory.check_run_fits(*configs, height=8192, width=8192, **run)
    message = str(caught.value)
    estimate = memory.estimate_run(*configs, height=8192, width=8192, **run)
    assert message.startswith(f"a 8192x8192 image needs {estimate.describe()}, more than the 8 GiB {memory.BUDGET_ENV}")
    assert "--tile-vae" in message  # tiling fits here: the tiny VAE's tiles are 128 px
    side = int(re.search(r"at most about (\d+)x\1 fits", message).group(1))
    assert memory.check_run_fits(*configs, height=side, width=side, **run).peak <= 8 * memory.GIB
    with pytest.raises(InputError):  # the largest that fits: one latent pixel more does not
        memory.check_run_fits(*configs, height=side + 8, width=side + 8, **run)
    assert memory.check_run_fits(*configs, height=8192, width=8192, **run | {"tiled_vae": True}).peak <= 8 * memory.GIB


def test_budget_variable_must_be_a_positive_number(monkeypatch):
    monkeypatch.setenv(memory.BUDGET_ENV, "lots")
    with pytest.raises(InputError, match=memory.BUDGET_ENV):
        memory.available_memory()


def test_sdxl_at_8192_is_refused_on_this_machine(monkeypatch):
    monkeypatch.delenv(memory.BUDGET_ENV, raising=False)
    budget, _ = memory.available_memory()
    assert 0 < budget < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with pytest.raises(InputError, match=r"needs about \d+ GiB \(decode"):
        memory.check_run_fits(*_sdxl(), height=8192, width=8192, **RUN)


_UNDER_RLIMIT = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, resource.RLIM_INFINITY))
import mlx_unet
from mlx_unet import SDXLPipeline
from mlx_unet.errors import InputError
pipe = SDXLPipeline.from_pretrained(sys.argv[1])
start = time.perf_counter()
try:
    pipe(sys.argv[2], height=8192, width=8192)
except InputError as e:
    print(f"{time.perf_counter() - start:.3f}", e)
"""


def test_refused_quickly_under_an_address_space_limit(tiny_pipeline):
    """With 2 GiB of address space (the tiny pipeline loads and runs in it), an 8192 px run is
    refused by ``SDXLPipeline.__call__`` within a second, naming the limit."""
    out = subprocess.run([sys.executable, "-c", _UNDER_RLIMIT, str(tiny_pipeline), PROMPT], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seconds, message = out.stdout.strip().split(" ", 1)
    assert float(seconds) < 1.0
    assert "RLIMIT_AS" in message and "at most about" in message, message


def test_the_command_refuses_what_cannot_fit_before_loading(tiny_pipeline, tmp_path):
    """The issue's repro: ``generate --height 8192 --width 8192`` on the tiny model, refused at start-up
    with exit code 2 in one line that gives the estimate, the budget and what would fit. At an 8 GiB
    budget the denoising fits and the whole decode does not (--no-tile-vae), so tiling is one way
    out; by default the decode is tiled by need, and the run fits. On the CPU kernels' path, whatever
    the environment says: its chunked attention is what lets the tiled run fit."""
    env = {**os.environ, memory.BUDGET_ENV: "8", ENV_SWITCH: "1"}
    out = tmp_path / "big.png"
    proc = run_cli("generate", PROMPT, "--model", str(tiny_pipeline), "-o", str(out), "--steps", "2",
                   "--height", "8192", "--width", "8192", "--no-tile-vae", "--quiet", env=env, timeout=60)
    line = assert_user_error(proc, "8192x8192 image needs about", f"8 GiB {memory.BUDGET_ENV}", "--tile-vae")
    assert re.search(r"at most about \d+x\d+ fits", line), line
    assert list(tmp_path.iterdir()) == []
    configs, run = _configs(tiny_pipeline), RUN | {"tiled_vae": None, "release_unet": True, "cpu_kernels": True}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(memory.BUDGET_ENV, "8")
        assert memory.check_run_fits(*configs, height=8192, width=8192, **run).peak <= 8 * memory.GIB
