"""to_original_layout checked against diffusers' own single-file loader, which maps the other way."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from original_layout import SINGLE_FILE_FAMILIES, ema_key, to_original_layout
from reference import torch_unet
from safetensors.torch import save_file

PREFIX = "model.diffusion_model."


def config_folder(path, config):
    """A local folder for ``from_single_file(config=...)``, so that it needs no network."""
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "config.json").write_text(json.dumps(config.to_diffusers_dict()))
    return str(path)


def load_single_file(file, folder, **kwargs) -> TorchUNet:
    return TorchUNet.from_single_file(str(file), config=folder, subfolder="unet", local_files_only=True, **kwargs)


def assert_same_parameters(loaded: TorchUNet, source: TorchUNet):
    expected, got = source.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    # from_single_file loads non-strictly: a parameter it found no weight for stays on "meta".
    not_loaded = [k for k, v in got.items() if v.is_meta]
    assert not not_loaded, not_loaded[:5]
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, differ[:5]


@pytest.mark.parametrize("family", list(SINGLE_FILE_FAMILIES))
def test_diffusers_loads_the_original_layout(family, tmp_path):
    config = SINGLE_FILE_FAMILIES[family]
    source = torch_unet(config, seed=3)
    state = source.state_dict()
    original = to_original_layout(state, config)
    assert len(original) == len(state)
    assert all(k.startswith(PREFIX) for k in original)

    file = tmp_path / "checkpoint.safetensors"
    save_file(original, str(file))
    loaded = load_single_file(file, config_folder(tmp_path / "config", config))
    assert_same_parameters(loaded, source)


# Names as they appear in the published sd_xl_base_1.0 and v1-5-pruned files. These pin what the
# loader cannot: diffusers accepts an upsampler at either output_blocks.N.1.conv or .2.conv.
WELL_KNOWN = {
    "sdxl-base": (
        "label_emb.0.0.weight", "time_embed.2.bias", "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight", "input_blocks.8.1.transformer_blocks.2.attn2.to_k.weight",
        "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.weight",
        "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.0.out_layers.3.bias",
        "out.2.weight",
    ),
    "sd15": (
        "input_blocks.1.1.proj_in.weight", "input_blocks.9.0.op.bias", "input_blocks.11.0.in_layers.2.weight",
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.11.1.norm.weight",
        "out.0.weight",
    ),
}


@pytest.mark.parametrize("family", list(WELL_KNOWN))
def test_original_names_of_well_known_tensors(family):
    config = SINGLE_FILE_FAMILIES[family]
    names = set(to_original_layout(torch_unet(config).state_dict(), config))
    missing = [n for n in WELL_KNOWN[family] if PREFIX + n not in names]
    assert not missing
    # The outermost up level has no upsampler, and SD 1.5 has no added embedding.
    last_output = {"sdxl-base": 8, "sd15": 11}[family]
    assert not any(".conv." in n for n in names if n.startswith(f"{PREFIX}output_blocks.{last_output}."))
    assert (PREFIX + "label_emb.0.0.weight" in names) == (family == "sdxl-base")


def test_ema_key_matches_litema():
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_extract_ema_loads_the_ema_copy(tmp_path):
    config = SINGLE_FILE_FAMILIES["sd15"]
    live, ema = torch_unet(config, seed=4), torch_unet(config, seed=5)
    checkpoint = to_original_layout(live.state_dict(), config)
    checkpoint |= {ema_key(k): v for k, v in to_original_layout(ema.state_dict(), config).items()}
    # LitEma's own buffers, present in real LDM checkpoints. (diffusers only honours extract_ema
    # when over 100 keys start with model_ema; the tiny sd15 has a few hundred tensors.)
    checkpoint["model_ema.decay"] = torch.tensor(0.9999)
    checkpoint["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    file = tmp_path / "checkpoint.safetensors"
    save_file(checkpoint, str(file))
    folder = config_folder(tmp_path / "config", config)

    assert_same_parameters(load_single_file(file, folder, extract_ema=True), ema)
    assert_same_parameters(load_single_file(file, folder), live)
