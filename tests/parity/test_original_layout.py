"""Files written in the original layout through our naming tables (tests/original_layout.py),
loaded by diffusers' own single-file loader and converters, which map the other way."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from original_layout import (
    BIGG_PREFIX,
    CLIP_L_PREFIX,
    SINGLE_FILE_FAMILIES,
    clip_to_original,
    open_clip_to_original,
    to_original_layout,
    vae_to_original,
)
from reference import torch_unet
from reference_text import torch_text_encoder
from reference_vae import torch_vae
from safetensors.torch import save_file

from mlx_unet import CLIPTextConfig, VAEConfig
from mlx_unet.naming.ldm_unet import ema_name

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


def test_ema_name_matches_litema():
    assert ema_name("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_extract_ema_loads_the_ema_copy(tmp_path):
    config = SINGLE_FILE_FAMILIES["sd15"]
    live, ema = torch_unet(config, seed=4), torch_unet(config, seed=5)
    checkpoint = to_original_layout(live.state_dict(), config)
    checkpoint |= {ema_name(k): v for k, v in to_original_layout(ema.state_dict(), config).items()}
    # LitEma's own buffers, present in real LDM checkpoints. (diffusers only honours extract_ema
    # when over 100 keys start with model_ema; the tiny sd15 has a few hundred tensors.)
    checkpoint["model_ema.decay"] = torch.tensor(0.9999)
    checkpoint["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    file = tmp_path / "checkpoint.safetensors"
    save_file(checkpoint, str(file))
    folder = config_folder(tmp_path / "config", config)

    assert_same_parameters(load_single_file(file, folder, extract_ema=True), ema)
    assert_same_parameters(load_single_file(file, folder), live)


# ---------------------------------------------------------------------- text encoders and VAE


@pytest.fixture(scope="module")
def components():
    """Tiny seeded text encoders and VAE; bigG's width differs from its projection's, so a
    transposed text_projection cannot pass for the right one."""
    clip_l = CLIPTextConfig.from_preset("tiny-clip-l", vocab_size=300, num_hidden_layers=2)
    bigg = CLIPTextConfig.from_preset("tiny-clip-bigg", vocab_size=300, num_hidden_layers=2)
    vae = VAEConfig.from_preset("tiny")
    return {"clip_l": torch_text_encoder(clip_l, seed=6), "bigg": torch_text_encoder(bigg, seed=7),
            "vae": (vae, torch_vae(vae, seed=8))}


def assert_same_tensors(got: dict, expected: dict):
    assert set(got) == set(expected)
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, differ[:5]


def test_diffusers_reads_the_original_vae_layout(components):
    config, vae = components["vae"]
    original = vae_to_original(vae.state_dict())
    assert len(original) == len(vae.state_dict())
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)
    # The decoder's first level in diffusers is ldm's last, the lowest resolution.
    assert torch.equal(original["first_stage_model.decoder.up.3.block.0.conv1.weight"],
                       vae.state_dict()["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert_same_tensors(convert_ldm_vae_checkpoint(original, config.to_diffusers_dict()), vae.state_dict())


@pytest.mark.parametrize("pipeline", ["base", "refiner"])
def test_diffusers_reads_the_original_open_clip_layout(components, pipeline):
    bigg = components["bigg"]
    prefix = BIGG_PREFIX[pipeline]
    original = open_clip_to_original(bigg.state_dict(), prefix)
    width, projection = bigg.config.hidden_size, bigg.config.projection_dim
    assert original[prefix + "text_projection"].shape == (width, projection)
    assert original[prefix + "transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * width, width)
    assert_same_tensors(convert_open_clip_checkpoint(bigg, original, prefix=prefix), bigg.state_dict())


def test_diffusers_reads_the_original_clip_layout(components):
    clip_l = components["clip_l"]
    original = clip_to_original(clip_l.state_dict())
    assert all(k.startswith(CLIP_L_PREFIX + "text_model.") for k in original)
    # diffusers keeps transformers 4's names, which transformers 5 reads into a bare CLIPTextModel.
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(original).items()}
    assert_same_tensors(converted, clip_l.state_dict())
