"""Images and PNGs a user feeds ``generate``: what can be used is converted (grayscale, palette,
transparency, 16 bits, EXIF orientation); what cannot is refused in one sentence, exit code 2,
before any model loads, with nothing written. The same for the prompts file, --from-png and the
options that go together."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from bad_input_helpers import PROMPT, RUN, assert_user_error, run_cli
from PIL import Image, PngImagePlugin

from mlx_unet import InputError, cli
from mlx_unet.cli import png_record
from mlx_unet.pipelines.images import read_image, read_inputs, read_mask
from mlx_unet.version import package_version

SIZE = (48, 64)  # (height, width) of the input images here: multiples of 8, unlike the model's 64x64


def _rgb(seed: int = 0, size=SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Inputs (in tmp_path) and an empty output folder, ``out``."""
    (tmp_path / "out").mkdir()
    Image.fromarray(_rgb()).save(tmp_path / "photo.png")
    Image.fromarray(np.full(SIZE, 255, np.uint8)).save(tmp_path / "mask.png")
    return {"image": tmp_path / "photo.png", "mask": tmp_path / "mask.png", "out": tmp_path / "out"}


def _refused(capsys, *args: str) -> str:
    """``mlx-unet generate ARGS`` in this process: exit code 2 and one line ``error: ...``; the line."""
    code = cli.main(["generate", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


# ---------------------------------------------------------------------------------- converted

def test_grayscale_palette_and_16_bit_images_become_rgb(tmp_path):
    gray = np.arange(SIZE[0] * SIZE[1], dtype=np.uint32).reshape(SIZE) % 256
    Image.fromarray(gray.astype(np.uint8), "L").save(tmp_path / "gray.png")
    assert np.array_equal(read_image(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, -1))
    Image.fromarray(_rgb()).quantize(16).save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as palette:
        assert np.array_equal(read_image(tmp_path / "palette.png"), np.asarray(palette.convert("RGB")))
    # 16 bits scaled to 8 (Pillow's own conversion clips all but the darkest values to white).
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(tmp_path / "deep.png")
    assert read_image(tmp_path / "deep.png")[0, :, 0].tolist() == [0, 100, 255]


def test_transparency_is_composited_on_white_and_a_mask_s_on_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :4, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    image = read_image(tmp_path / "cutout.png")
    assert image[0, 0].tolist() == [200, 0, 0] and image[0, 7].tolist() == [255, 255, 255]
    mask = read_mask(tmp_path / "cutout.png")  # transparent: kept (black); red counts by its luma
    assert mask[0, 7] == 0 and mask[0, 0] == round(200 * 0.299)
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.save(tmp_path / "palette.png", transparency=1)
    assert read_image(tmp_path / "palette.png").tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_exif_orientation_is_applied(tmp_path):
    stored = _rgb(1, (16, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    assert np.array_equal(read_image(tmp_path / "phone.png"), np.rot90(stored, -1))


def test_grayscale_and_transparent_inputs_run(tiny_pipeline, files, tmp_path):
    Image.fromarray(_rgb()[..., 0], "L").save(tmp_path / "gray.png")
    rgba = np.concatenate([_rgb(), np.full((*SIZE, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    for source in ("gray.png", "half.png"):
        out = files["out"] / f"from-{source}"
        assert cli.main(["generate", PROMPT, "--model", str(tiny_pipeline), "-o", str(out), *RUN, "--image",
                         str(tmp_path / source), "--strength", "1", "--mask", str(files["mask"])]) == 0
        with Image.open(out) as written:  # at --height and --width, which resize the input
            assert written.size == (64, 64) and written.mode == "RGB"


def test_sizes_are_rounded_down_to_multiples_of_8_or_set(tmp_path):
    Image.fromarray(_rgb(2, (61, 70))).save(tmp_path / "odd.png")
    Image.fromarray(np.zeros((61, 70), np.uint8)).save(tmp_path / "odd-mask.png")
    inputs = read_inputs(tmp_path / "odd.png", tmp_path / "odd-mask.png")
    assert inputs.image.shape == (1, 56, 64, 3) and inputs.mask.shape == (1, 56, 64) and inputs.resized
    assert read_inputs(tmp_path / "odd.png", height=32, width=40).image.shape == (1, 32, 40, 3)


# ---------------------------------------------------------------------------------- refused

def _damaged(tmp_path: Path) -> Path:
    Image.fromarray(_rgb()).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.png"


def _float_tiff(tmp_path: Path) -> Path:
    Image.fromarray(np.zeros(SIZE, np.float32), "F").save(tmp_path / "float.tif")
    return tmp_path / "float.tif"


IMAGES = {
    "not an image": (lambda t: (t / "notes.png").write_text("not a picture") and t / "notes.png",
                     "is not an image Pillow can read; pass a PNG, JPEG or WebP file."),
    "truncated": (_damaged, "is damaged or cut short"),
    "missing": (lambda t: t / "nowhere.png", "does not exist; check the path of the image."),
    "a folder": (lambda t: t / "out", "is a folder; pass an image file"),
    "floating point": (_float_tiff, "holds floating-point pixels, which have no fixed range"),
    "too small": (lambda t: Image.new("RGB", (100, 5)).save(t / "strip.png") or t / "strip.png",
                  "is 100x5 pixels (width x height); it needs at least 8 pixels each way."),
}


@pytest.mark.parametrize("case", list(IMAGES))
def test_an_image_that_cannot_be_used_is_refused(tiny_pipeline, files, tmp_path, capsys, case):
    make, expected = IMAGES[case]
    image = make(tmp_path)
    line = _refused(capsys, PROMPT, "--model", str(tiny_pipeline), "-o", str(files["out"] / "x.png"), "--steps", "2",
                    "--quiet", "--image", str(image), "--strength", "1")  # the image's size: no --height, --width
    assert str(image) in line and expected in line, line
    assert list(files["out"].iterdir()) == []
    if case != "too small":  # a size fit for no image is the image's, not the mask's
        with pytest.raises(InputError, match=re.escape(expected)):
            read_mask(image)  # masks are read the same way


def test_a_mask_of_another_size_is_refused_before_loading(tiny_pipeline, files, tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "small.png")
    proc = run_cli("generate", PROMPT, "--model", str(tiny_pipeline), "-o", str(files["out"] / "x.png"), *RUN,
                   "--image", str(files["image"]), "--strength", "1", "--mask", str(tmp_path / "small.png"))
    assert_user_error(proc, f"the mask {tmp_path / 'small.png'} is 32x32 pixels and the image {files['image']} "
                            "64x48 (width x height); make the mask the image's size.")
    assert list(files["out"].iterdir()) == []


def _png_with(tmp_path: Path, **texts: str) -> Path:
    info = PngImagePlugin.PngInfo()
    for keyword, text in texts.items():
        info.add_text(keyword.replace("_", "-"), text)
    Image.new("RGB", (8, 8)).save(tmp_path / "made.png", pnginfo=info)
    return tmp_path / "made.png"


def _record(**settings) -> str:
    return json.dumps({"format": 1, "mlx_unet": package_version(), "mlx": mx.__version__, "settings": settings,
                       "inputs": {}})


PNGS = {
    "a JPEG": (lambda t: Image.new("RGB", (8, 8)).save(t / "made.jpg") or t / "made.jpg",
               "is a JPEG file, not a PNG"),
    "no parameters": (lambda t: _png_with(t), "carries no generation parameters"),
    "a damaged record": (lambda t: _png_with(t, mlx_unet='{"format": 1, "settings": {'),
                         "has a damaged mlx-unet record"),
    "a record of another format": (lambda t: _png_with(t, mlx_unet='{"format": 7, "settings": {}}'),
                                   "record of a format this version does not read"),
    "a bad value": (lambda t: _png_with(t, mlx_unet=_record(prompt="p", demo=True, steps="many")),
                    "records a setting this version cannot use (argument --steps: invalid int value: 'many')"),
    "an unknown sampler": (lambda t: _png_with(t, parameters="p\nSteps: 2, Sampler: DPM++ SDE, Seed: 1, Size: 8x8"),
                           "was made with the sampler 'DPM++ SDE', which mlx-unet does not have; pass --scheduler"),
    "no model": (lambda t: _png_with(t, parameters="p\nSteps: 2, Sampler: Euler, Seed: 1, Model: dreamy_v3"),
                 "was made by another tool with the model 'dreamy_v3'; name that model with --model."),
}


@pytest.mark.parametrize("case", list(PNGS))
def test_from_png_refuses_what_it_cannot_rerun(files, tmp_path, capsys, case):
    make, expected = PNGS[case]
    png = make(tmp_path)
    line = _refused(capsys, "--from-png", str(png), "-o", str(files["out"] / "x.png"), "--quiet")
    assert str(png) in line and expected in line, line
    assert list(files["out"].iterdir()) == []


def _prompts_file(tmp_path: Path, content: bytes) -> Path:
    (tmp_path / "prompts.txt").write_bytes(content)
    return tmp_path / "prompts.txt"


OPTIONS = {
    "missing prompts file": (lambda t: ["--prompts", str(t / "none.txt"), "--demo"],
                             "the prompts file {t}/none.txt does not exist"),
    "prompts file not UTF-8": (lambda t: ["--prompts", str(_prompts_file(t, b"caf\xe9\n")), "--demo"],
                               "is not UTF-8 text (byte 3); save it as UTF-8."),
    "empty prompts file": (lambda t: ["--prompts", str(_prompts_file(t, b"\n  \n")), "--demo"],
                           "holds no prompt; write one prompt a line."),
    "a prompt and a file": (lambda t: [PROMPT, "--prompts", str(_prompts_file(t, b"p\n")), "--demo"],
                            "give a prompt or --prompts FILE, not both."),
    "no prompt": (lambda t: ["--model", str(t)], "give a prompt (or --prompts FILE, or --from-png IMG)."),
    "no model": (lambda t: [PROMPT], "give --model (a converted folder"),
    "demo and a model": (lambda t: [PROMPT, "--demo", "--model", str(t)], "--demo makes its own model"),
    "a mask alone": (lambda t: [PROMPT, "--demo", "--mask", str(t / "mask.png")], "--mask needs --image"),
    "strength alone": (lambda t: [PROMPT, "--demo", "--strength", "0.5"], "--strength goes with --image"),
    "seeds past the last": (lambda t: [PROMPT, "--demo", "--seed", str(2**64 - 2), "-n", "3"],
                            f"--seed {2**64 - 2} with -n 3 runs past the largest seed"),
    "clip skip too deep": (lambda t: [PROMPT, "--demo", "--clip-skip", "9"],
                           "--clip-skip must be an integer from 0 to 2, got 9."),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_options_that_cannot_go_together_are_refused(files, tmp_path, capsys, case):
    make, expected = OPTIONS[case]
    line = _refused(capsys, *make(tmp_path), "-o", str(files["out"] / "x.png"), "--quiet")
    assert expected.format(t=tmp_path) in line, line
    assert list(files["out"].iterdir()) == []
