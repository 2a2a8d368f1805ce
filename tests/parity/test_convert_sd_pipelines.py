"""convert() on SD 1.x / 2.x pipelines and on inpainting ones (SD and SDXL) from diffusers
folders and a Hub snapshot -> MLX pipeline folders whose every tensor is the reference's and whose
models compute what the reference's compute. (Single files: test_convert_sd_single_files.py.)"""

import json
import shutil

import huggingface_hub
import mlx.core as mx
import pytest
from axes import these_fast
from sd_pipeline_files import assert_models_compute_the_same, assert_tokenizes_the_same, diffusers_pipeline, models_of
from test_convert import _hub_cache
from test_convert_pipeline import assert_converted, listing

from mlx_unet import UNetConfig
from mlx_unet.configs.base import FORMAT_KEY
from mlx_unet.convert import convert


FOLDER_FAMILIES = ["sd15", "sd2", "sd15-inpaint", "sdxl-inpaint"]


@pytest.fixture(scope="module")
def folder_pipelines(tmp_path_factory):
    """family -> (pipeline, its folder), each made once, when first asked for."""
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = diffusers_pipeline(tmp_path_factory.mktemp(family), family, seed=10)
        return made[family]

    return get


# The fast tier shares the families out between these two tests.
@pytest.mark.parametrize("family", these_fast(FOLDER_FAMILIES, {"sd15", "sdxl-inpaint"}))
def test_diffusers_folder_converts_whole(tmp_path, folder_pipelines, family):
    pipe, source = folder_pipelines(family)
    result = convert(source, tmp_path / "mlx", progress=False)  # float16, the VAE too (force_upcast is off)
    out = tmp_path / "mlx"
    models = models_of(pipe)
    tokenizers = [t for t in ("tokenizer", "tokenizer_2") if getattr(pipe, t, None) is not None]
    assert listing(out) == sorted([*(f"{n}/{f}" for n in models for f in ("config.json", "model.safetensors")),
                                   *(f"{t}/{f}" for t in tokenizers for f in ("merges.txt", "tokenizer_config.json",
                                                                              "vocab.json")),
                                   "model_index.json", "scheduler/scheduler_config.json"])
    for name, model in models.items():
        assert_converted(out, name, model, mx.float16)
    assert result.dtypes == dict.fromkeys(models, "float16")
    assert json.loads((out / "model_index.json").read_text()) == \
        {**json.loads((source / "model_index.json").read_text()), FORMAT_KEY: "1"}
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == \
        json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    assert UNetConfig.from_json(out / "unet").in_channels == (9 if family.endswith("inpaint") else 4)
    assert_tokenizes_the_same(out, pipe)


@pytest.mark.parametrize("family", these_fast(FOLDER_FAMILIES, {"sd15-inpaint", "sd2"}))
def test_diffusers_folder_models_compute_as_diffusers(tmp_path, folder_pipelines, family):
    pipe, source = folder_pipelines(family)
    convert(source, tmp_path / "mlx", dtype="float32", progress=False)
    assert_models_compute_the_same(tmp_path / "mlx", pipe)


def test_safety_checker_is_left_alone_and_prediction_type_overridden(tmp_path, folder_pipelines):
    """A published SD 1.5 repo lists a safety checker and its feature extractor: they are not
    converted (diffusers' pipelines run without them) and listed as absent."""
    _pipe, source = folder_pipelines("sd15")
    copied = shutil.copytree(source, tmp_path / "pipe")
    index = json.loads((copied / "model_index.json").read_text())
    index |= {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": True}
    (copied / "model_index.json").write_text(json.dumps(index))
    result = convert(copied, tmp_path / "mlx", prediction_type="v_prediction", progress=False)
    assert result.notes[0] == "left alone: feature_extractor, safety_checker"
    written = json.loads((tmp_path / "mlx" / "model_index.json").read_text())
    assert written["safety_checker"] == written["feature_extractor"] == [None, None]
    scheduler = json.loads((tmp_path / "mlx" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == {**json.loads((copied / "scheduler" / "scheduler_config.json").read_text()),
                         "prediction_type": "v_prediction"}
    assert "prediction type: v_prediction (--prediction-type), instead of the scheduler config's epsilon" \
        in result.notes


def test_img2img_pipeline_folder_keeps_its_class(tmp_path, folder_pipelines):
    """diffusers saves an img2img pipeline with its own class name; the models are the same."""
    pipe, source = folder_pipelines("sd15")
    copied = shutil.copytree(source, tmp_path / "pipe")
    index = json.loads((copied / "model_index.json").read_text())
    (copied / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionImg2ImgPipeline"}))
    convert(copied, tmp_path / "mlx", dtype="float32", progress=False)
    assert json.loads((tmp_path / "mlx" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionImg2ImgPipeline"
    for name, model in models_of(pipe).items():
        assert_converted(tmp_path / "mlx", name, model, mx.float32)


def test_hub_snapshot_of_an_sd_pipeline(tmp_path, folder_pipelines, monkeypatch):
    pipe, source = folder_pipelines("sd2")
    files = {str(p.relative_to(source)): p for p in source.rglob("*") if p.is_file()}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = _hub_cache(tmp_path / "hub", "someone/sd2", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    result = convert("someone/sd2", tmp_path / "mlx", dtype="float32", progress=False)
    assert result.configs["unet"].cross_attention_dim == 40
    for name, model in models_of(pipe).items():
        assert_converted(tmp_path / "mlx", name, model, mx.float32)
    assert json.loads((tmp_path / "mlx" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
