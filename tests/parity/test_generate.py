"""What users run: ``mlx-unet generate`` on a pipeline converted with the converter's defaults
(float16 UNet and text encoders, float32 VAE), every option end to end and checked for its
effect, and the default run against diffusers."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_files import SIZE, converted_pipelines
from reference import relative_error

from mlx_unet import SDXLPipeline, UNet2DConditionModel, cli, cpu
from mlx_unet.pipelines.diffusion import DiffusionPipeline
from mlx_unet.pipelines.images import write_png

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a watercolour of a lighthouse at dusk"
RUN = ["--steps", "2", "--height", str(SIZE), "--width", str(SIZE), "--seed", "3"]  # later flags override
API_RUN = dict(steps=2, height=SIZE, width=SIZE, seed=3)  # the same run through SDXLPipeline
FP16 = 1e-2  # the default run (float16 weights) against diffusers in float32, per image, as in test_parity.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return converted_pipelines(tmp_path_factory.mktemp("generate"), dtype="float16")  # convert's default


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def _generate(files, out: Path, *flags: str) -> np.ndarray:
    """``mlx-unet generate`` in this process; the image it wrote."""
    assert cli.main(["generate", PROMPT, "--model", str(files["mlx"]), "-o", str(out), *RUN, *flags]) == 0
    return _read_png(out)


@pytest.fixture(scope="module")
def default_image(files, tmp_path_factory):
    return _generate(files, tmp_path_factory.mktemp("default") / "out.png", "--quiet")


def _pipeline(files, **kwargs) -> SDXLPipeline:
    return SDXLPipeline.from_pretrained(files["mlx"], **kwargs)  # with from_pretrained's defaults, as the CLI


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    """Apart by more than rounding (float16's, a batch of one against two) moves a pixel."""
    return np.abs(a.astype(np.int16) - b).max() > 8


@torch.no_grad()
@pytest.mark.usefixtures("code_path")  # float16 on the CPU kernels and on plain MLX
def test_the_default_run_matches_diffusers(files):
    pipe = _pipeline(files)
    assert pipe.unet.dtype == cpu.computes_in(mx.float16) and pipe.vae.dtype == mx.float32
    assert pipe.unet.conv_in.weight.dtype == mx.float16
    latents = np.random.default_rng(0).standard_normal((2, SIZE // 8, SIZE // 8, 4), dtype=np.float32)
    ours = pipe(PROMPT, steps=3, height=SIZE, width=SIZE, num_images_per_prompt=2, latents=mx.array(latents),
                output="float")
    theirs = files["base"](PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, num_images_per_prompt=2,
                           latents=torch.from_numpy(latents).permute(0, 3, 1, 2).contiguous(), output_type="np").images
    assert all(image.std() > 0.05 for image in theirs)  # varied images, not flat clamps
    assert relative_error(ours, theirs) <= FP16


def test_default_options_write_what_the_pipeline_makes(files, default_image):
    assert default_image.shape == (SIZE, SIZE, 3)
    assert np.array_equal(default_image, _pipeline(files)(PROMPT, **API_RUN)[0])


def test_batch_writes_numbered_images_of_consecutive_seeds(files, tmp_path):
    # One image per seed (3, then 4), each as a run of one image with that seed makes it.
    out = tmp_path / "many.png"
    first = _generate(files, out, "-n", "2")
    second = _read_png(tmp_path / "many-1.png")
    pipe = _pipeline(files)
    assert np.array_equal(first, pipe(PROMPT, **API_RUN)[0])
    assert np.array_equal(second, pipe(PROMPT, **{**API_RUN, "seed": 4})[0])
    assert _differ(first, second)
    for path, seed in ((out, 3), (tmp_path / "many-1.png", 4)):
        with Image.open(path) as image:
            assert f"Seed: {seed}," in image.text["parameters"]


def test_model_takes_a_diffusers_folder_converted_once_into_the_cache(files, default_image, tmp_path, cache, capsys):
    source = str(files["diffusers"])
    for run, said in ((1, "converting"), (2, "using")):
        image = _generate({**files, "mlx": source}, tmp_path / f"run{run}.png")
        assert np.array_equal(image, default_image)  # converted as convert's defaults convert it
        assert f"{said} {source}" in capsys.readouterr().err
    entries = sorted(cache.iterdir())
    image = _generate({**files, "mlx": source}, tmp_path / "temporary.png", "--no-cache")
    assert np.array_equal(image, default_image) and "temporary folder" in capsys.readouterr().err
    assert sorted(cache.iterdir()) == entries  # the cache untouched


def test_seed_steps_guidance_and_size_are_used(files, default_image, tmp_path):
    assert np.array_equal(_generate(files, tmp_path / "a.png"), default_image)  # same seed: same image
    assert _differ(_generate(files, tmp_path / "b.png", "--seed", "4"), default_image)
    assert _differ(_generate(files, tmp_path / "c.png", "--steps", "3"), default_image)
    unguided = _generate(files, tmp_path / "d.png", "--guidance", "1")
    assert np.array_equal(unguided, _pipeline(files)(PROMPT, **API_RUN, guidance=1.0)[0])
    assert _differ(unguided, default_image)
    assert _generate(files, tmp_path / "e.png", "--height", "48", "--width", "80").shape == (48, 80, 3)


def test_negative_prompt_and_scheduler_change_the_image(files, default_image, tmp_path):
    negative = _generate(files, tmp_path / "n.png", "--negative-prompt", "fog, grey")
    assert np.array_equal(negative, _pipeline(files)(PROMPT, "fog, grey", **API_RUN)[0])
    assert _differ(negative, default_image)
    multistep = _generate(files, tmp_path / "s.png", "--scheduler", "dpmpp_2m")
    assert np.array_equal(multistep, _pipeline(files)(PROMPT, **API_RUN, scheduler="dpmpp_2m")[0])
    assert _differ(multistep, default_image)  # (euler_a is close to euler at 2 steps)


def test_dtypes_and_vae_tiling_are_used(files, default_image, tmp_path, monkeypatch):
    from mlx_unet.pipelines import diffusion

    # (On the CPU a float16 run may be held in float32 and so give float32's image: the dtype is
    # checked where the UNet loads.)
    loads, load_unet = [], diffusion._load_unet
    monkeypatch.setattr(diffusion, "_load_unet", lambda parts, dtype, *a, **k: loads.append(dtype)
                        or load_unet(parts, dtype, *a, **k))
    full = _generate(files, tmp_path / "full.png", "--dtype", "float32")
    _generate(files, tmp_path / "default.png")
    assert loads == [mx.float32, mx.float16]
    monkeypatch.undo()
    assert np.array_equal(full, _pipeline(files, dtype=mx.float32)(PROMPT, **API_RUN)[0])

    pipe = _pipeline(files)
    latents = pipe(PROMPT, **API_RUN, output="latent")
    half = _generate(files, tmp_path / "half.png", "--vae-dtype", "float16")
    assert np.array_equal(half, _pipeline(files, vae_dtype=mx.float16).decode(latents)[0])
    assert 0 < np.abs(half.astype(np.int16) - default_image).max()

    tiled = _generate(files, tmp_path / "tiled.png", "--tile-vae")
    pipe.vae.enable_tiling()
    assert np.array_equal(tiled, pipe.decode(latents)[0])
    assert 0 < np.abs(tiled.astype(np.int16) - default_image).max()  # the tiles did blend

    # By need (the default): tiles only under a budget the whole decode exceeds.
    budget = 0.0001
    by_need = _generate(files, tmp_path / "need.png", "--vae-memory-budget", str(budget))
    pipe.vae.enable_tiling_by_need(int(budget * 2**30))
    assert pipe.vae.decode_tile_size(latents.shape) is not None
    assert np.array_equal(by_need, pipe.decode(latents)[0])
    assert 0 < np.abs(by_need.astype(np.int16) - default_image).max()
    assert np.array_equal(_generate(files, tmp_path / "whole.png", "--no-tile-vae"), default_image)


def test_low_memory_runs_guidance_halves_block_by_block(files, default_image, tmp_path, monkeypatch):
    calls = []
    denoise = UNet2DConditionModel.denoise

    def recorded(self, sample, *args, after_block=None):
        calls.append((sample.shape[0], after_block))
        return denoise(self, sample, *args, after_block=after_block)

    monkeypatch.setattr(UNet2DConditionModel, "denoise", recorded)
    limit = mx.set_cache_limit(3 << 30)
    try:
        image = _generate(files, tmp_path / "low.png", "--low-memory")
        assert mx.set_cache_limit(limit) == 3 << 30  # restored after the run
    finally:
        mx.set_cache_limit(limit)
    assert calls == [(1, mx.eval)] * 4  # two steps, two halves each
    # The same image, up to float16 rounding of a batch of one against a batch of two.
    assert np.abs(image.astype(np.int16) - default_image).max() <= 2


def test_refiner_finishes_the_schedule(files, default_image, tmp_path, capsys, monkeypatch):
    """A one-shot run frees the base UNet before the refiner's loads, and the refiner's before the
    decode: never two UNets at once."""
    from mlx_unet.pipelines import diffusion

    events = []
    load_unet, release = diffusion._load_unet, DiffusionPipeline.release_unet
    monkeypatch.setattr(diffusion, "_load_unet", lambda parts, *a, **k: events.append(("load", parts.family))
                        or load_unet(parts, *a, **k))
    monkeypatch.setattr(DiffusionPipeline, "release_unet", lambda self: events.append(("release", self.parts.family))
                        or release(self))
    image = _generate(files, tmp_path / "r.png", "--refiner", str(files["mlx_refiner"]), "--refiner-start", "0.5")
    monkeypatch.undo()
    base, refiner = (SDXLPipeline.from_pretrained(files[k]).parts.family for k in ("mlx", "mlx_refiner"))
    assert events == [("load", base), ("release", base), ("load", refiner), ("release", refiner)]
    assert "refiner" in capsys.readouterr().err
    refiner = SDXLPipeline.from_pretrained(files["mlx_refiner"])
    assert np.array_equal(image, _pipeline(files)(PROMPT, **API_RUN, refiner=refiner, refiner_start=0.5)[0])
    assert _differ(image, default_image)


def test_quiet_prints_nothing(files, tmp_path):
    out = tmp_path / "q.png"
    proc = subprocess.run([sys.executable, "-m", "mlx_unet", "generate", PROMPT, "--model", str(files["mlx"]),
                           "-o", str(out), *RUN, "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert _read_png(out).shape == (SIZE, SIZE, 3)
    loud = subprocess.run([sys.executable, "-m", "mlx_unet.cli.generate", PROMPT, "--model", str(files["mlx"]),
                           "-o", str(out), *RUN], capture_output=True, text=True, cwd=ROOT)
    assert loud.returncode == 0 and "2/2" in loud.stderr and f"wrote {out}" in loud.stderr


def test_user_errors_are_one_line_and_exit_2(files, tmp_path):
    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "mlx_unet", *args], capture_output=True, text=True, cwd=ROOT)
        return proc.returncode, proc.stderr

    code, err = run("generate", PROMPT, "--model", str(tmp_path))
    assert code == 2 and err.startswith("error: ") and "model_index.json" in err and len(err.splitlines()) == 1
    (tmp_path / "taken.png").mkdir()  # an OSError: the output is a folder
    code, err = run("generate", PROMPT, "--model", str(files["mlx"]), "-o", str(tmp_path / "taken.png"), *RUN)
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"]  # no temporary file left
    code, err = run("paint", PROMPT)
    assert code == 2 and "unknown command 'paint'" in err and "generate" in err
    assert run()[0] == 2


def test_commands_have_help():
    for module in ("mlx_unet", "mlx_unet.cli.generate", "mlx_unet.generate"):
        args = [sys.executable, "-m", module, *(["generate"] if module == "mlx_unet" else []), "--help"]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0 and "--tile-vae" in proc.stdout and "mlx-unet generate" in proc.stdout
    listing = subprocess.run([sys.executable, "-m", "mlx_unet", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert listing.returncode == 0 and all(command in listing.stdout for command in ("generate", "convert", "info"))


def test_a_failed_low_memory_run_restores_the_cache_limit(files):
    def interrupt(stage, step):
        raise KeyboardInterrupt

    limit = mx.set_cache_limit(3 << 30)
    try:
        with pytest.raises(KeyboardInterrupt):
            _pipeline(files)(PROMPT, **API_RUN, low_memory=True, callback=interrupt)
        assert mx.set_cache_limit(limit) == 3 << 30
    finally:
        mx.set_cache_limit(limit)


def test_png_writes_are_atomic_and_readable_by_all(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(b"an older image")
    write_png(path, image)
    assert np.array_equal(_read_png(path), image)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temporary file left
    with pytest.raises(ValueError, match="uint8"):
        write_png(path, image.astype(np.float32))
    assert np.array_equal(_read_png(path), image)
