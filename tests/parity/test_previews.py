"""Previews and drafts with the tiny VAE, end to end: ``mlx-unet generate --vae tiny`` and
``--preview-every``, and the API's ``load_tiny_vae`` / ``preview_every`` / ``vae="tiny"``, on a tiny
random SDXL pipeline, with the tiny VAE fetched as madebyollin/taesdxl from a local Hub snapshot.
Every image is checked against diffusers' AutoencoderTiny decoding the same latents."""

import json

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from pipeline_files import SIZE, diffusers_pipeline
from reference import relative_error
from reference_vae import torch_decode
from reference_tiny_vae import hub_snapshot, torch_tiny_vae

from mlx_unet import InputError, PipelineError, SDXLPipeline, TinyVAEConfig, cli
from mlx_unet.convert import convert
from mlx_unet.pipelines.previews import PreviewStep

PROMPT = "a watercolour of a lighthouse at dusk"
RUN = ["--steps", "2", "--height", str(SIZE), "--width", str(SIZE), "--seed", "3", "--quiet"]
API_RUN = dict(steps=2, height=SIZE, width=SIZE, seed=3)  # the same run through SDXLPipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The base pipeline converted with convert's defaults; the tiny VAE (TAESD's structure at a
    small width) in diffusers, saved, and as the Hub cache's madebyollin/taesdxl."""
    tmp = tmp_path_factory.mktemp("previews")
    _, folder = diffusers_pipeline(tmp, refiner=False)
    convert(folder, tmp / "mlx", progress=False)
    tiny = torch_tiny_vae(TinyVAEConfig.from_preset("tiny"), seed=90, centred=True)
    tiny.save_pretrained(tmp / "taesd-diffusers")
    return {"mlx": tmp / "mlx", "tiny": tiny, "tiny_folder": tmp / "taesd-diffusers",
            "hub": hub_snapshot(tiny, tmp / "taesd", "madebyollin/taesdxl")}


@pytest.fixture
def offline_hub(files, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(files["hub"]))


def _read_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def _generate(files, out, *flags):
    assert cli.main(["generate", PROMPT, "--model", str(files["mlx"]), "-o", str(out), *RUN, *flags]) == 0
    return _read_png(out)


def _diffusers_tiny_image(files, latents: mx.array, as_uint8: bool = True) -> np.ndarray:
    """diffusers' AutoencoderTiny decoding scaled latents as its SDXL pipeline does (divided by its
    scaling_factor, 1), postprocessed as diffusers' image processor does: floats in [0, 1], or uint8."""
    images = torch_decode(files["tiny"], np.array(latents) / files["tiny"].config.scaling_factor)
    images = np.clip(images / 2 + 0.5, 0, 1)
    return (images * 255).round().astype(np.uint8) if as_uint8 else images


def _matches(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Equal up to a float32 rounding that moves a pixel across a rounding boundary; and a real
    image, not flat clamped values."""
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(np.int16) - theirs).max() <= 1
    assert theirs.std() > 20 and np.mean((theirs == 0) | (theirs == 255)) < 0.1


@pytest.mark.usefixtures("offline_hub")
def test_vae_tiny_decodes_the_final_latents_as_diffusers_tiny_vae(files, tmp_path):
    image = _generate(files, tmp_path / "draft.png", "--vae", "tiny")
    pipe = SDXLPipeline.from_pretrained(files["mlx"])
    latents = pipe(PROMPT, **API_RUN, output="latent")
    _matches(image, _diffusers_tiny_image(files, latents)[0])
    assert np.abs(image.astype(np.int16) - pipe.decode(latents)[0]).max() > 8  # not the full VAE's image
    pipe.load_tiny_vae()  # the family's default, madebyollin/taesdxl: the same weights
    assert pipe.tiny_vae.dtype == pipe.vae.dtype == mx.float32
    assert np.array_equal(image, pipe(PROMPT, **API_RUN, vae="tiny")[0])
    error = relative_error(pipe(PROMPT, **API_RUN, vae="tiny", output="float"),
                           _diffusers_tiny_image(files, latents, as_uint8=False))
    print(f"--vae tiny against diffusers' AutoencoderTiny, fp32: {error:.2e}")
    assert error <= 1e-4
    with Image.open(tmp_path / "draft.png") as png:
        settings = json.loads(png.text["mlx-unet"])["settings"]
    assert settings["vae"] == "tiny" and "tiny_vae" not in settings  # the default source is not recorded

    # --tiny-vae: a diffusers folder, and one mlx-unet converted (float16: --vae-dtype float16 runs it so).
    assert np.array_equal(_generate(files, tmp_path / "a.png", "--vae", "tiny", "--tiny-vae",
                                    str(files["tiny_folder"])), image)
    convert(files["tiny_folder"], tmp_path / "taesd-mlx", progress=False)
    half = _generate(files, tmp_path / "b.png", "--vae", "tiny", "--tiny-vae", str(tmp_path / "taesd-mlx"),
                     "--vae-dtype", "float16")
    assert 0 < np.abs(half.astype(np.int16) - image).max() <= 3


@pytest.mark.usefixtures("offline_hub")
def test_previews_are_written_every_n_steps(files, tmp_path, monkeypatch):
    from mlx_unet.cli import generate

    written = []
    write_png = generate.write_png
    monkeypatch.setattr(generate, "write_png", lambda path, image, *a: written.append(path) or write_png(path, image, *a))
    out = tmp_path / "out.png"
    image = _generate(files, out, "--preview-every", "1", "--preview", str(tmp_path / "p.png"))
    preview = tmp_path / "p.png"
    assert written == [preview, preview, out]  # each step's, then the image
    pipe = SDXLPipeline.from_pretrained(files["mlx"])
    assert np.array_equal(image, pipe(PROMPT, **API_RUN)[0])  # the image itself: the full VAE's, unchanged
    # The last preview is the finished latents through the tiny VAE.
    _matches(_read_png(preview), _diffusers_tiny_image(files, pipe(PROMPT, **API_RUN, output="latent"))[0])
    with Image.open(out) as png:
        assert "preview" not in json.loads(png.text["mlx-unet"])["settings"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "p.png"]  # no temporary file left

    written.clear()  # 3 steps, every 2: the second and the last; beside the output by default
    _generate(files, tmp_path / "x.png", "--preview-every", "2", "--steps", "3")
    assert written == [tmp_path / "x.preview.png"] * 2 + [tmp_path / "x.png"]
    assert _read_png(tmp_path / "x.preview.png").shape == (SIZE, SIZE, 3)


@pytest.mark.usefixtures("offline_hub")
def test_api_previews_reach_the_callback(files):
    pipe = SDXLPipeline.from_pretrained(files["mlx"])
    for call in (dict(vae="tiny"), dict(preview_every=1, callback=print)):
        with pytest.raises(InputError, match="load_tiny_vae"):
            pipe(PROMPT, **API_RUN, **call)
    pipe.load_tiny_vae(files["tiny_folder"])
    steps = []
    final = pipe(PROMPT, **{**API_RUN, "steps": 3}, preview_every=2, callback=lambda stage, step: steps.append(step))
    assert all(isinstance(step, PreviewStep) for step in steps)
    assert [step.preview is not None for step in steps] == [False, True, True]
    for step in steps[1:]:
        assert step.preview.shape == (1, SIZE, SIZE, 3) and step.preview.dtype == np.uint8
        _matches(step.preview[0], _diffusers_tiny_image(files, step.latents)[0])
    assert np.array_equal(final, pipe(PROMPT, **{**API_RUN, "steps": 3}))  # previews change nothing
    for bad, message in ((dict(vae="medium"), "'full' or 'tiny'"), (dict(preview_every=0, callback=print), "at least 1"),
                         (dict(preview_every=2), "pass a callback")):
        with pytest.raises(InputError, match=message):
            pipe(PROMPT, **API_RUN, **bad)


def test_tiny_vae_sources_that_are_not_one_are_refused_before_converting(files, tmp_path, capsys):
    for source, message in ((files["mlx"], "is a pipeline"),
                            (files["mlx"] / "unet", "describes a UNet2DConditionModel, not a AutoencoderTiny")):
        code = cli.main(["generate", PROMPT, "--model", str(files["mlx"]), "-o", str(tmp_path / "o.png"), *RUN,
                         "--vae", "tiny", "--tiny-vae", str(source)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: the tiny VAE") and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    pipe = SDXLPipeline.from_pretrained(files["mlx"])
    wider = torch_tiny_vae(TinyVAEConfig.from_preset("tiny", latent_channels=16), seed=1)
    wider.save_pretrained(tmp_path / "sixteen")
    with pytest.raises(PipelineError, match="decodes 16-channel latents"):
        pipe.load_tiny_vae(tmp_path / "sixteen")
    assert pipe.tiny_vae is None
