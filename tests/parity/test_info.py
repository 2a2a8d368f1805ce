"""``mlx-unet info``: what a diffusers folder, a converted folder, an original single file and a
cached Hub repo are, from their configs and headers, against the reference models' own counts."""

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from original_layout import SINGLE_FILE_FAMILIES, sd_single_file, sdxl_single_file
from reference import torch_unet
from reference_text import torch_text_encoder
from reference_vae import torch_vae
from safetensors.torch import save_file
from test_convert import _hub_cache
from test_convert_pipeline import SMALL_TEXT, tiny_parts, write_pipeline

from mlx_unet import CLIPTextConfig, VAEConfig
from mlx_unet.cli import main
from mlx_unet.cli.info import describe, format_info, lora_mode
from mlx_unet.configs.families import unet_family
from mlx_unet.convert import convert
from mlx_unet.safetensors_io import SafetensorsReader

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # _hub_cache's
SMALL_VAE = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    parts = tiny_parts(refiner=False, seed=62)
    return SimpleNamespace(parts=parts, source=write_pipeline(tmp_path_factory.mktemp("base") / "pipe", parts))


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_bytes(folder: Path) -> int:
    return sum(t.end - t.begin for f in folder.glob("*.safetensors") for t in SafetensorsReader(f).tensors.values())


def test_a_diffusers_pipeline_and_its_conversions(tmp_path, base):
    info = describe(base.source)
    assert info.kind == "diffusers pipeline (StableDiffusionXLPipeline)"
    assert info.family == unet_family(base.parts.configs["unet"])
    assert (info.prediction_type, info.prediction_note) == ("epsilon", "the scheduler config's")
    assert list(info.parts) == ["unet", "text_encoder", "text_encoder_2", "vae"]
    for name, part in info.parts.items():
        assert part.parameters == parameters(base.parts.models[name]), name
        assert part.bytes == weights_bytes(base.source / name) and part.dtypes == ["float32"], name
        assert part.quantization is None and lora_mode(name, part) == ("fused or live" if name != "vae" else None)

    result = convert(base.source, tmp_path / "q", quantize=4, q_group_size=32, progress=False)
    converted = describe(tmp_path / "q")
    assert converted.kind == "converted pipeline (StableDiffusionXLPipeline)" and converted.family == info.family
    assert result.quantization["unet"].bits == 4
    for name, part in converted.parts.items():
        assert part.parameters == info.parts[name].parameters, name  # the dense model's, stored quantized or not
        assert part.bytes == weights_bytes(tmp_path / "q" / name), name
        assert part.dtypes == ["float32" if name == "vae" else "float16"], name
        assert part.quantization == result.quantization.get(name), name
        if name != "vae":
            expected = "live only (quantized)" if name in result.quantization else "fused or live"
            assert lora_mode(name, part) == expected, name

    convert(base.source / "unet", tmp_path / "unet", progress=False)
    for folder, kind in ((base.source / "unet", "diffusers UNet alone"), (tmp_path / "unet", "converted UNet alone")):
        alone = describe(folder)
        assert alone.kind == kind and list(alone.parts) == ["unet"] and alone.prediction_type is None
        assert alone.parts["unet"].parameters == info.parts["unet"].parameters


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl-refiner"])
def test_original_single_files(tmp_path, family):
    unet_config = SINGLE_FILE_FAMILIES[family]
    vae = VAEConfig.from_preset("sdxl", **SMALL_VAE)
    models = {"unet": torch_unet(unet_config, seed=90), "vae": torch_vae(vae, seed=91)}
    state = {name: model.state_dict() for name, model in models.items()}
    if family == "sdxl-refiner":
        bigg = CLIPTextConfig.from_preset("sdxl-clip-bigg", **SMALL_TEXT)
        models["text_encoder_2"] = torch_text_encoder(bigg, seed=92)
        tensors = sdxl_single_file(state["unet"], unet_config, models["text_encoder_2"].state_dict(), state["vae"])
        expected = ("epsilon", "stabilityai/stable-diffusion-xl-refiner-1.0")
    else:
        preset = "sd2-clip-h" if family == "sd2" else "sdxl-clip-l"
        models["text_encoder"] = torch_text_encoder(CLIPTextConfig.from_preset(preset, **SMALL_TEXT), seed=92)
        tensors = sd_single_file(state["unet"], unet_config, models["text_encoder"].state_dict(), state["vae"],
                                 open_clip=family == "sd2")
        expected = ("v_prediction", "stabilityai/stable-diffusion-2-1") if family == "sd2" else \
            ("epsilon", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    path = tmp_path / f"{family}.safetensors"
    save_file(tensors, str(path))

    info = describe(path)
    assert info.kind == "original single file" and info.family == unet_family(unet_config)
    assert info.prediction_type == expected[0] and expected[1] in info.prediction_note
    assert sorted(info.parts) == sorted(models)
    for name, part in info.parts.items():
        # SD 2.x files hold OpenCLIP's whole text tower: the last layer too, which SD 2.x does not use.
        if not (family == "sd2" and name == "text_encoder"):
            assert part.parameters == parameters(models[name]), name
        assert part.dtypes == ["float32"] and part.quantization is None
    assert info.parts["vae"].what == "VAE (4 latent channels)"
    if family != "sdxl-refiner":
        assert info.notes and info.notes[0].startswith("not converted: ") and "betas" in info.notes[0]


def test_a_hub_repo_in_the_hugging_face_cache(tmp_path, base, monkeypatch):
    """Read from the cache alone: the network calls fail if made."""
    def no_network(*args, **kwargs):
        raise AssertionError("info reached for the network")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", no_network)
    files = {str(p.relative_to(base.source)): p for p in base.source.rglob("*") if p.is_file()}
    full_cache = _hub_cache(tmp_path / "hub", "someone/tiny", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(full_cache))
    info = describe("someone/tiny")
    assert info.kind == ("diffusers pipeline (StableDiffusionXLPipeline), Hub repo in the Hugging Face cache "
                         f"(commit {COMMIT})")
    local = describe(base.source)
    assert {n: p.parameters for n, p in info.parts.items()} == {n: p.parameters for n, p in local.parts.items()}

    configs_only = {k: v for k, v in files.items() if not k.endswith(".safetensors")}
    partial_cache = _hub_cache(tmp_path / "hub2", "someone/tiny", configs_only)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(partial_cache))
    partial = describe("someone/tiny")
    assert all(p.bytes is None for p in partial.parts.values())
    assert format_info(partial).count("weights not here") == 4


def test_the_command_prints_aligned_lines_or_json(base, capsys):
    assert main(["info", str(base.source)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = ["model", "kind", "family", "prediction", "unet", "text_encoder", "text_encoder_2", "vae"]
    assert [line.split()[0] for line in lines] == names
    column = len("text_encoder_2  ")
    assert all(len(line) > column and line[column - 1] == " " and line[column] != " " for line in lines), lines
    assert lines[0] == "model".ljust(column) + str(base.source)
    assert "LoRA: fused or live" in lines[4] and "no LoRA" in lines[7]

    assert main(["info", str(base.source), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(describe(base.source).to_json()))
    assert printed["parts"]["unet"]["lora"] == "fused or live" and printed["parts"]["vae"]["lora"] is None
