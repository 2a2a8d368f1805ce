"""The conversion cache and ``mlx-unet info`` given what they cannot use: a source that is no model
or no whole pipeline, a cache folder that cannot be written, options out of range. One sentence
(exit code 2 for the command), nothing written, no source changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from bad_input_helpers import assert_user_error, run_cli, tree_digest, write_diffusers_unet, write_single_file
from safetensors.numpy import save_file

from mlx_unet import UNetConfig
from mlx_unet.cache import cache_dir, cached_pipeline, converted_pipeline
from mlx_unet.cli import main
from mlx_unet.errors import MlxUnetError

TINY = UNetConfig.from_preset("tiny")
SD15 = UNetConfig.from_preset("sd15", block_out_channels=[32, 64, 64, 64])  # a family the file's shapes show
CACHE_FIX = "set MLX_UNET_CACHE to a folder you can write, or pass --no-cache."


@pytest.fixture
def temporary(tmp_path, monkeypatch) -> Path:
    """Where --no-cache conversions go (tempfile's folder), to show nothing is left there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(folder))
    return folder


def _folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    path.mkdir(exist_ok=True)
    return path


def _vae_file(path: Path) -> Path:
    save_file({"first_stage_model.encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32),
               "first_stage_model.decoder.conv_in.weight": np.zeros((8, 4, 3, 3), np.float32)}, str(path))
    return path


# name -> (the source, made in a folder, with the tiny converted pipeline at hand; what the sentence says)
NOT_PIPELINES = {
    "missing": (lambda tmp, pipe: "./nowhere/model.safetensors",
                "the model ./nowhere/model.safetensors does not exist; check the path."),
    "neither": (lambda tmp, pipe: "not a model!", "not a model! is neither a file, a folder nor a Hub repo id"),
    "empty folder": (lambda tmp, pipe: _folder(tmp / "empty", {}), "is a folder that holds no model"),
    "bad model_index": (lambda tmp, pipe: _folder(tmp / "bad", {"model_index.json": "{"}),
                        "model_index.json is not valid JSON"),
    "converted UNet": (lambda tmp, pipe: pipe / "unet", "is a UNet alone converted by mlx-unet (convert --unet-only)"),
    "diffusers UNet": (lambda tmp, pipe: write_diffusers_unet(tmp / "unet", TINY), "holds only a UNet"),
    "single-file UNet": (lambda tmp, pipe: write_single_file(tmp / "unet.safetensors", SD15), "holds only a UNet"),
    "not safetensors": (lambda tmp, pipe: _folder(tmp, {"notes.safetensors": "hello"}) / "notes.safetensors",
                        "is not a safetensors file"),
}


@pytest.mark.parametrize("name", list(NOT_PIPELINES))
def test_a_source_that_is_no_pipeline_is_refused(tmp_path, tiny_pipeline, cache, temporary, name):
    make, words = NOT_PIPELINES[name]
    source = make(_folder(tmp_path / "sources", {}), tiny_pipeline)
    before = [tree_digest(tmp_path / "sources"), tree_digest(tiny_pipeline)]
    for use_cache in (True, False):
        with pytest.raises(MlxUnetError) as refused, converted_pipeline(source, use_cache=use_cache, progress=False):
            pytest.fail("a folder was given")
        assert words in str(refused.value) and "\n" not in str(refused.value)
    assert not cache.exists() and list(temporary.iterdir()) == []
    assert [tree_digest(tmp_path / "sources"), tree_digest(tiny_pipeline)] == before


def test_a_cache_folder_that_cannot_be_used_is_refused(tmp_path, monkeypatch):
    source = write_diffusers_unet(tmp_path / "unet", TINY)
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    inside = blocker / "cache"
    for root, words in ((blocker, f"the mlx-unet cache {blocker} is a file, not a folder; {CACHE_FIX}"),
                        (inside, f"the mlx-unet cache {inside} cannot be made: {blocker} is a file; {CACHE_FIX}")):
        monkeypatch.setenv("MLX_UNET_CACHE", str(root))
        with pytest.raises(MlxUnetError) as refused:
            cached_pipeline(source, progress=False)
        assert str(refused.value) == words
    assert blocker.read_text() == "mine"


def test_an_unwritable_cache_folder_is_refused(tmp_path, monkeypatch):
    source = write_diffusers_unet(tmp_path / "unet", TINY)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    # Root may write into a 0555 folder: the access check is told what a user would be told.
    can_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and can_access(path, mode))
    monkeypatch.setenv("MLX_UNET_CACHE", str(locked / "cache"))
    with pytest.raises(MlxUnetError, match=f"cannot be written .{locked} is not writable.; set MLX_UNET_CACHE"):
        cached_pipeline(source, progress=False)


@pytest.mark.parametrize("options, words", [
    ({"dtype": "float8"}, "dtype 'float8' is not one of float16, bfloat16, float32."),
    ({"vae_dtype": "half"}, "vae_dtype 'half' is not one of"),
    ({"prediction_type": "sample"}, "prediction type 'sample' is not one of epsilon, v_prediction."),
    ({"quantize": 3}, "affine quantization takes 8 or 4 bits, got 3."),
    ({"quantize_text_encoders": 8}, "--quantize-text-encoders goes with --quantize"),
], ids=["dtype", "vae_dtype", "prediction_type", "quantize", "text encoders alone"])
def test_options_out_of_range_are_refused_first(tmp_path, tiny_pipeline, cache, options, words):
    for source in (tiny_pipeline, write_diffusers_unet(tmp_path / "unet", TINY)):  # converted or not
        with pytest.raises(MlxUnetError, match=words.replace(".", r"\.")):
            cached_pipeline(source, progress=False, **options)
        shutil.rmtree(tmp_path / "unet", ignore_errors=True)
    assert not cache.exists()


def test_where_the_cache_is(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLX_UNET_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "mlx-unet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mlx-unet"
    monkeypatch.setenv("MLX_UNET_CACHE", "~/models")
    assert cache_dir() == tmp_path / "home" / "models"


# ---------------------------------------------------------------------- info

NOT_DESCRIBABLE = {
    "missing": (lambda tmp: tmp / "nowhere.safetensors", "does not exist; check the path."),
    "empty folder": (lambda tmp: _folder(tmp / "empty", {}), "is a folder that holds no model"),
    "not safetensors": (lambda tmp: _folder(tmp, {"x.safetensors": "hello"}) / "x.safetensors",
                        "is not a safetensors file"),
    "pickle": (lambda tmp: _folder(tmp, {"model.ckpt": "pickle"}) / "model.ckpt",
               "is a PyTorch pickle, which cannot be read without running it"),
    "VAE alone": (lambda tmp: _vae_file(tmp / "vae.safetensors"), "holds a VAE, not a Stable Diffusion checkpoint"),
    "no unet listed": (lambda tmp: _folder(tmp / "pipe", {"model_index.json": json.dumps({"_class_name": "X"})}),
                       "lists no unet in model_index.json"),
    "bad config": (lambda tmp: _folder(tmp / "pipe", {"unet/config.json": "[]"}), "UNet config must be a JSON object"),
    "Hub id not cached": (lambda tmp: "someone/nothing", "someone/nothing (revision main) is not in the Hugging Face"),
}


@pytest.mark.parametrize("name", list(NOT_DESCRIBABLE))
def test_info_refuses_what_it_cannot_describe(tmp_path, monkeypatch, capsys, name):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    make, words = NOT_DESCRIBABLE[name]
    source = make(_folder(tmp_path / "sources", {}))
    before = tree_digest(tmp_path / "sources")
    assert main(["info", str(source)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert tree_digest(tmp_path / "sources") == before


def test_info_from_the_command_line(tmp_path, tiny_pipeline):
    assert_user_error(run_cli("info", str(tmp_path / "nowhere")), "does not exist")
    assert_user_error(run_cli("info"), "the following arguments are required: MODEL")
    described = run_cli("info", str(tiny_pipeline))
    assert described.returncode == 0 and described.stderr == ""
    assert described.stdout.splitlines()[1].split() == ["kind", "converted", "pipeline", "(StableDiffusionXLPipeline)"]
