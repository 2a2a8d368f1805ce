"""convert() on original SD 1.x / 2.x single files (ldm layout; and SDXL inpainting's, sgm) ->
MLX pipeline folders, text encoder and VAE included, checked tensor for tensor against the torch
models the file was written from and against diffusers' own single-file loader; their models
compute what the reference's compute."""

import json
from types import SimpleNamespace

import mlx.core as mx
import pytest
import torch
from axes import these_fast
from original_layout import SINGLE_FILE_FAMILIES, sd_single_file, sdxl_single_file, to_original_layout
from reference import torch_unet
from reference_text import torch_text_encoder
from reference_vae import torch_vae
from safetensors.torch import save_file
from sd_pipeline_files import (
    FAMILY_KEYS,
    SD_TEXT,
    VAE,
    assert_models_compute_the_same,
    published_scheduler,
    sd_pipeline_class,
    single_file_text_config,
    write_sd_single_file,
)
from test_convert import run_cli
from test_convert_pipeline import assert_converted, listing
from tokenizer_files import END, write_clip_tokenizer
from transformers import CLIPTokenizer as TorchCLIPTokenizer

from mlx_unet import CLIPTextConfig, UNetConfig, VAEConfig
from mlx_unet.configs.base import FORMAT_KEY
from mlx_unet.convert import convert
from mlx_unet.convert.published import PUBLISHED
from mlx_unet.errors import ConversionError
from mlx_unet.safetensors_io import SafetensorsReader
from mlx_unet.tokenizer import bundled_tokenizer_files


FILE_FAMILIES = ["sd15", "sd2", "sd15-inpaint", "sd2-inpaint"]


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """family -> (path, torch models by our component names, their configs), each made once."""
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = write_sd_single_file(tmp_path_factory.mktemp(family), family)
        return made[family]

    return get


# The fast tier shares the families out between these two tests.
@pytest.mark.parametrize("family", these_fast(FILE_FAMILIES, {"sd15", "sd2-inpaint"}))
def test_single_file_converts_whole(tmp_path, single_files, family):
    path, models, configs = single_files(family)
    published = PUBLISHED[FAMILY_KEYS[family]]
    result = convert(path, tmp_path / "mlx", dtype="float32", progress=False)
    out = tmp_path / "mlx"
    assert listing(out) == sorted([*(f"{n}/{f}" for n in models for f in ("config.json", "model.safetensors")),
                                   *(f"tokenizer/{f}" for f in bundled_tokenizer_files()),
                                   "model_index.json", "scheduler/scheduler_config.json"])
    for name, model in models.items():
        assert_converted(out, name, model, mx.float32)
    assert UNetConfig.from_json(out / "unet") == configs["unet"]
    assert CLIPTextConfig.from_json(out / "text_encoder") == configs["text_encoder"]
    assert VAEConfig.from_json(out / "vae") == configs["vae"]

    pad = "!" if family.startswith("sd2") else END
    assert {f.name: f.read_bytes() for f in (out / "tokenizer").iterdir()} == bundled_tokenizer_files(pad)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == published.scheduler
    assert json.loads((out / "model_index.json").read_text()) == {
        "_class_name": "StableDiffusionInpaintPipeline" if family.endswith("inpaint") else "StableDiffusionPipeline",
        "scheduler": ["diffusers", published.scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], FORMAT_KEY: "1"}
    left = ["alphas_cumprod", "betas", "model_ema.decay", "model_ema.num_updates"]
    if family.startswith("sd2"):  # CLIP's temperature, the tower's last layer and its projection
        unused = ("cond_stage_model.model.logit_scale", "cond_stage_model.model.transformer.resblocks.2.",
                  "cond_stage_model.model.text_projection")
        left = sorted([*left, *(k for k in _keys(path) if k.startswith(unused))])
        assert len(left) == 4 + 1 + 12 + 1
    else:
        left = sorted([*left, "cond_stage_model.transformer.text_model.embeddings.position_ids"])
    assert f"left alone: {len(left)} tensors ({', '.join(left[:3])}, ...)" in result.notes
    if family.startswith("sd2"):
        assert ("left alone: the OpenCLIP text encoder's last layer (cond_stage_model.model.transformer.resblocks.2.*) "
                "and cond_stage_model.model.text_projection, as in diffusers: SD 2.x conditions on the penultimate "
                "layer") in result.notes
    assert any(n.startswith("prediction type: v_prediction, as diffusers assumes") for n in result.notes) == \
        (family == "sd2")


def _keys(path) -> list[str]:
    return list(SafetensorsReader(path).tensors)


@pytest.mark.parametrize("family", these_fast(FILE_FAMILIES, {"sd15-inpaint", "sd2"}))
def test_single_file_as_diffusers_loads_it(tmp_path, single_files, family):
    """diffusers' from_single_file, given a folder of the same configs, reads the file to the
    tensors we wrote, and those are the source models' (so it did not keep its own init)."""
    path, models, _configs = single_files(family)
    cls = sd_pipeline_class(family)
    tokenizer = TorchCLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok"))
    cls(**models, tokenizer=tokenizer, scheduler=published_scheduler(family), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path / "configs")
    theirs = cls.from_single_file(str(path), config=str(tmp_path / "configs"), local_files_only=True)
    convert(path, tmp_path / "mlx", dtype="float32", progress=False)
    for name, model in models.items():
        loaded = getattr(theirs, name).state_dict()
        assert not [k for k, v in loaded.items() if v.is_meta], name
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items()), name
        assert_converted(tmp_path / "mlx", name, getattr(theirs, name), mx.float32)


# The inpainting files differ from these in conv_in alone, which the tensor checks cover.
@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_single_file_models_compute_as_diffusers(tmp_path, single_files, family):
    path, models, _configs = single_files(family)
    convert(path, tmp_path / "mlx", dtype="float32", progress=False)
    assert_models_compute_the_same(tmp_path / "mlx", SimpleNamespace(**models))


def test_sd2_single_file_prediction_type_override(tmp_path, single_files):
    """SD 2.x's v-prediction default is what one may need to override (for the 512 base model)."""
    path, _models, _configs = single_files("sd2")
    result = convert(path, tmp_path / "mlx", prediction_type="epsilon", progress=False)
    scheduler = json.loads((tmp_path / "mlx" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == {**PUBLISHED[(1024, False)].scheduler, "prediction_type": "epsilon"}
    assert "prediction type: epsilon (--prediction-type), instead of the scheduler config's v_prediction" \
        in result.notes
    assert not any("as diffusers assumes" in n for n in result.notes)


def test_sd1_text_encoder_without_text_model_names(tmp_path, single_files):
    """Checkpoints saved before transformers 4.x's ``text_model.`` name the CLIP text model's
    parts directly under ``cond_stage_model.transformer.``."""
    _path, models, configs = single_files("sd15")
    tensors = sd_single_file(models["unet"].state_dict(), configs["unet"], models["text_encoder"].state_dict(),
                             models["vae"].state_dict(), open_clip=False, text_model=False)
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in tensors
    save_file(tensors, str(tmp_path / "old.safetensors"))
    convert(tmp_path / "old.safetensors", tmp_path / "mlx", dtype="float32", progress=False)
    assert_converted(tmp_path / "mlx", "text_encoder", models["text_encoder"], mx.float32)


def test_sdxl_inpainting_single_file(tmp_path):
    """sgm layout, a 9-channel UNet: SDXL's inpainting pipeline, both bundled tokenizers."""
    unet = SINGLE_FILE_FAMILIES["sdxl-inpaint"]
    clip_l = CLIPTextConfig.from_preset("sdxl-clip-l", num_hidden_layers=2, **SD_TEXT)
    bigg = CLIPTextConfig.from_preset("sdxl-clip-bigg", num_hidden_layers=2, **SD_TEXT)
    vae = VAEConfig.from_preset("sdxl", **VAE)
    models = {"unet": torch_unet(unet, seed=30), "text_encoder": torch_text_encoder(clip_l, seed=31),
              "text_encoder_2": torch_text_encoder(bigg, seed=32), "vae": torch_vae(vae, seed=33)}
    states = {n: m.state_dict() for n, m in models.items()}
    save_file(sdxl_single_file(states["unet"], unet, states["text_encoder_2"], states["vae"], states["text_encoder"]),
              str(tmp_path / "sdxl_inpaint.safetensors"))
    convert(tmp_path / "sdxl_inpaint.safetensors", tmp_path / "mlx", dtype="float32", progress=False)
    for name, model in models.items():
        assert_converted(tmp_path / "mlx", name, model, mx.float32)
    index = json.loads((tmp_path / "mlx" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    assert index["force_zeros_for_empty_prompt"] is True and index["requires_aesthetics_score"] is False
    for name, pad in (("tokenizer", END), ("tokenizer_2", "!")):
        assert {f.name: f.read_bytes() for f in (tmp_path / "mlx" / name).iterdir()} == bundled_tokenizer_files(pad)


# ---------------------------------------------------------------------- bad input


def test_single_file_of_an_unknown_family_needs_unet_only(tmp_path, single_files):
    """A UNet whose cross-attention width no family has converts with its --config, but not whole."""
    _path, _models, configs = single_files("sd15")
    config = configs["unet"].to_diffusers_dict() | {"cross_attention_dim": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = torch_unet(UNetConfig.from_dict(config), seed=1).state_dict()
    save_file({**to_original_layout(weights, UNetConfig.from_dict(config)), "first_stage_model.x": torch.ones(1)},
              str(tmp_path / "odd.safetensors"))
    with pytest.raises(ConversionError, match=r"odd.safetensors is an SD-like \(512-wide text\) checkpoint, of no "
                                              "family whose text encoders and scheduler mlx-unet knows; pass "
                                              "--unet-only to convert its UNet.$"):
        convert(tmp_path / "odd.safetensors", tmp_path / "out", config=tmp_path / "config.json", progress=False)
    assert not (tmp_path / "out").exists()


def test_text_encoder_of_another_family_is_refused(tmp_path, single_files):
    """An SD 1.x UNet beside SD 2.x's OpenCLIP text encoder: the widths do not fit."""
    _path, models, configs = single_files("sd15")
    _text, tower = single_file_text_config("sd2")
    tensors = sd_single_file(models["unet"].state_dict(), configs["unet"], torch_text_encoder(tower).state_dict(),
                             models["vae"].state_dict(), open_clip=True)
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ConversionError, match=r"the text encoders give 1024-wide token states but the UNet's "
                                              "cross-attention takes 768; these models do not belong together.$"):
        convert(tmp_path / "mixed.safetensors", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_prediction_type_is_for_whole_pipelines(tmp_path, single_files):
    path, _models, _configs = single_files("sd2")
    proc = run_cli(path, tmp_path / "out", "--unet-only", "--prediction-type", "epsilon")
    assert proc.returncode == 2
    assert proc.stderr == "error: --prediction-type is for whole pipelines; drop it with --unet-only.\n"
    with pytest.raises(ConversionError, match=r"^prediction type 'sample' is not one of epsilon, v_prediction\.$"):
        convert(path, tmp_path / "out", prediction_type="sample", progress=False)
    assert not (tmp_path / "out").exists()
