"""``mlx-unet generate`` with images in and out, on the demo's tiny pipeline (MLX alone): every PNG
records what made it and ``--from-png`` remakes it bit for bit; -n numbers seeds; --prompts
numbers outputs; img2img and inpainting from files run as the API does on the arrays read."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from mlx_unet import cli, load_pipeline
from mlx_unet.demo import MODEL_NAME, write_demo_pipeline
from mlx_unet.pipelines.images import read_inputs
from mlx_unet.pipelines.parameters import parse_parameters

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a lighthouse at dusk"
RUN = ["--steps", "2", "--height", "64", "--width", "64", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_demo_pipeline(tmp_path_factory.mktemp("demo") / "pipeline")


def _generate(*args: str) -> None:
    assert cli.main(["generate", *args]) == 0


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def _texts(path: Path) -> tuple[dict, dict]:
    """(the parameters text's fields with prompt and negative prompt, our record's settings)."""
    with Image.open(path) as image:
        parsed = parse_parameters(image.text["parameters"])
        record = json.loads(image.text["mlx-unet"])
    return {"prompt": parsed.prompt, "negative": parsed.negative_prompt, **parsed.fields}, record["settings"]


def test_each_image_of_a_batch_has_its_seed_and_reruns_bit_for_bit(model, tmp_path):
    out = tmp_path / "out.png"
    _generate(PROMPT, "--model", str(model), "-o", str(out), *RUN, "-n", "2", "--seed", "5",
              "--negative-prompt", "fog, grey", "--scheduler", "dpmpp_2m_karras", "--clip-skip", "1",
              "--guidance", "4", "--dtype", "float32")
    first, second = _pixels(out), _pixels(tmp_path / "out-1.png")
    assert np.abs(first.astype(int) - second).max() > 8  # two seeds, two images
    fields, settings = _texts(tmp_path / "out-1.png")
    assert fields == {"prompt": PROMPT, "negative": "fog, grey", "Steps": "2", "Sampler": "DPM++ 2M",
                      "Schedule type": "Karras", "CFG scale": "4", "Seed": "6", "Size": "64x64", "Model": "pipeline", "Clip skip": "2",
                      "Version": fields["Version"]}
    assert settings == dict(prompt=PROMPT, model=str(model), negative_prompt="fog, grey", steps=2, guidance=4.0,
                            height=64, width=64, seed=6, scheduler="dpmpp_2m", sigmas="karras", clip_skip=1,
                            dtype="float32")

    _generate("--from-png", str(tmp_path / "out-1.png"), "-o", str(tmp_path / "again.png"), "--quiet")
    assert np.array_equal(_pixels(tmp_path / "again.png"), second)
    # A flag given replaces the recorded setting: the first image's PNG with the second's seed.
    _generate("--from-png", str(out), "--seed", "6", "-o", str(tmp_path / "seed6.png"), "--quiet")
    assert np.array_equal(_pixels(tmp_path / "seed6.png"), second)
    # As the API makes the image of that seed alone.
    pipe = load_pipeline(model, dtype=mx.float32)
    api = pipe(PROMPT, "fog, grey", steps=2, guidance=4.0, height=64, width=64, seed=6,
               scheduler="dpmpp_2m_karras", clip_skip=1)[0]
    assert np.array_equal(api, second)


def test_img2img_and_inpainting_from_files_rerun_bit_for_bit(model, tmp_path):
    rng = np.random.default_rng(0)
    source, mask = tmp_path / "photo.jpg", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 256, (61, 70, 3), dtype=np.uint8)).save(source, quality=90)
    drawn = np.zeros((61, 70), np.uint8)
    drawn[10:40, 20:60] = 255
    Image.fromarray(drawn).save(mask)
    for flags, name in (([], "img2img.png"), (["--mask", str(mask)], "inpaint.png")):
        out = tmp_path / name
        _generate(PROMPT, "--model", str(model), "-o", str(out), "--steps", "4", "--seed", "2", "--quiet",
                  "--image", str(source), "--strength", "0.6", *flags)
        image = _pixels(out)
        assert image.shape == (56, 64, 3)  # 61x70 resized down to multiples of 8, as diffusers does
        fields, settings = _texts(out)
        assert fields["Denoising strength"] == "0.6" and fields["Size"] == "64x56"
        assert settings["image"] == str(source) and settings["strength"] == 0.6 and settings.get("mask") == \
            (str(mask) if flags else None)
        inputs = read_inputs(source, mask if flags else None)
        api = load_pipeline(model)(PROMPT, steps=4, seed=2, image=inputs.image, mask_image=inputs.mask, strength=0.6)
        assert np.array_equal(api[0], image)
        _generate("--from-png", str(out), "-o", str(tmp_path / "again.png"), "--quiet")
        assert np.array_equal(_pixels(tmp_path / "again.png"), image)


def test_a_changed_input_file_is_warned_of(model, tmp_path, capsys):
    source = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(source)
    out = tmp_path / "out.png"
    _generate(PROMPT, "--model", str(model), "-o", str(out), *RUN, "--seed", "1", "--image", str(source),
              "--strength", "1")
    Image.fromarray(np.full((64, 64, 3), 91, np.uint8)).save(source)
    _generate("--from-png", str(out), "-o", str(tmp_path / "again.png"), "--quiet")
    assert f"warning: {source} is not the file {out} was made from" in capsys.readouterr().err


def test_prompts_file_numbers_its_images_and_each_prompt_takes_the_seeds(model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\ufeffa red door\n\n   \na blue boat  \n", encoding="utf-8")
    out = tmp_path / "many.png"
    _generate("--prompts", str(prompts), "--model", str(model), "-o", str(out), *RUN, "-n", "2", "--seed", "10")
    made = [out, *(tmp_path / f"many-{i}.png" for i in range(1, 4))]
    assert sorted(p.name for p in tmp_path.glob("many*.png")) == sorted(p.name for p in made)
    recorded = [(_texts(p)[1]["prompt"], _texts(p)[1]["seed"]) for p in made]
    assert recorded == [("a red door", 10), ("a red door", 11), ("a blue boat", 10), ("a blue boat", 11)]
    _generate("a blue boat", "--model", str(model), "-o", str(tmp_path / "one.png"), *RUN, "--seed", "11")
    assert np.array_equal(_pixels(tmp_path / "one.png"), _pixels(made[3]))


def test_another_tools_png_gives_its_common_settings(model, tmp_path):
    png = tmp_path / "web-ui.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red door <lora:ink:0.5>\nNegative prompt: fog\nSteps: 2, Sampler: Euler a, "
                                "CFG scale: 3, Seed: 9, Size: 48x64, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, "
                                "Clip skip: 2, Version: v1.10.1")
    Image.new("RGB", (48, 64)).save(png, pnginfo=info)
    out = tmp_path / "out.png"
    assert cli.main(["generate", "--from-png", str(png), "--model", str(model), "-o", str(out), "--quiet"]) == 0
    assert _pixels(out).shape == (64, 48, 3)
    _, settings = _texts(out)
    assert {k: settings.get(k) for k in ("prompt", "negative_prompt", "steps", "scheduler", "guidance", "seed",
                                         "clip_skip")} == \
        dict(prompt="a red door", negative_prompt="fog", steps=2, scheduler="euler_a", guidance=3.0, seed=9, clip_skip=1)


def test_demo_makes_a_png_end_to_end(tmp_path):
    # As a newcomer runs it: the installed module, in a fresh process, nothing but --demo.
    for module, out in (("mlx_unet", tmp_path / "demo.png"), ("mlx_unet.generate", tmp_path / "again.png")):
        command = [sys.executable, "-m", module, *(["generate"] if module == "mlx_unet" else []), "--demo",
                   "--steps", "2", "--seed", "4", "-o", str(out)]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {out}" in proc.stderr
    image = _pixels(tmp_path / "demo.png")
    assert image.shape == (128, 128, 3) and image.std() > 5  # the tiny model's own size; not a flat image
    assert np.array_equal(_pixels(tmp_path / "again.png"), image)  # the same random pipeline every time
    fields, settings = _texts(tmp_path / "demo.png")
    assert fields["Model"] == MODEL_NAME and settings["demo"] is True and settings["steps"] == 2
