"""mlx_unet.naming's tables against diffusers' own single-file converters, run here on the same
original-layout state dicts: every stored tensor must land on the same diffusers name, with the
same values, both ways; and single module names (LoRA, ControlNet files) map through the tables."""

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from original_layout import SINGLE_FILE_FAMILIES, clip_to_original, open_clip_to_original, to_original_layout, \
    vae_to_original
from reference import tiny_config, torch_unet
from reference_text import torch_text_encoder
from reference_vae import torch_vae

from mlx_unet import CLIPTextConfig, VAEConfig
from mlx_unet.naming import NameTable
from mlx_unet.naming.clip import CLIP_L_PREFIX, OPEN_CLIP_PREFIX, CLIPNames, OpenCLIPNames, checkpoint_names
from mlx_unet.naming.ldm_unet import UNetNames
from mlx_unet.naming.ldm_vae import VAENames


def read_through(table: NameTable, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``original`` under diffusers' names as our table reads it; every key must have a place."""
    names, unmapped = table.names(original)
    assert not unmapped, unmapped[:5]
    return {name: take.apply(original[take.key]) for name, take in names.items()}


def assert_same(ours: dict, theirs: dict, expected: dict):
    assert set(ours) == set(theirs) == set(expected)
    differ = [k for k in expected if not (torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], expected[k]))]
    assert not differ, differ[:5]


UNETS = {**{f"single-file {f}": c for f, c in SINGLE_FILE_FAMILIES.items()},
         **{f"tiny {f}": tiny_config(f) for f in ("sd15", "sd2", "sdxl-base", "sdxl-refiner")}}


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_names_match_diffusers(name):
    config = UNETS[name]
    state = torch_unet(config, seed=12).state_dict()
    original = to_original_layout(state, config)
    assert len(original) == len(state)
    theirs = convert_ldm_unet_checkpoint(original, config.to_diffusers_dict())
    assert_same(read_through(UNetNames(config), original), theirs, state)


VAES = {"tiny": VAEConfig.from_preset("tiny"),
        "sdxl-shaped": VAEConfig.from_preset("sdxl", block_out_channels=[32, 32, 64, 64], layers_per_block=1)}


@pytest.mark.parametrize("name", list(VAES))
def test_vae_names_match_diffusers(name):
    config = VAES[name]
    state = torch_vae(config, seed=13).state_dict()
    original = vae_to_original(state)
    theirs = convert_ldm_vae_checkpoint(original, config.to_diffusers_dict())
    assert_same(read_through(VAENames(config), original), theirs, state)


@pytest.mark.parametrize("pipeline", ["base", "refiner"])
def test_open_clip_names_match_diffusers(pipeline):
    config = CLIPTextConfig.from_preset("tiny-clip-bigg", vocab_size=300, num_hidden_layers=2)
    model = torch_text_encoder(config, seed=14)
    prefix = OPEN_CLIP_PREFIX[pipeline]
    original = open_clip_to_original(model.state_dict(), prefix)
    theirs = checkpoint_names(convert_open_clip_checkpoint(model, original, prefix=prefix))
    expected = checkpoint_names(model.state_dict())
    assert_same(read_through(OpenCLIPNames(config, prefix), original), theirs, expected)


def test_clip_names_match_diffusers():
    config = CLIPTextConfig.from_preset("tiny-clip-l", vocab_size=300, num_hidden_layers=2)
    model = torch_text_encoder(config, seed=15)
    original = clip_to_original(model.state_dict())
    original[CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]  # a buffer, no parameter
    theirs = checkpoint_names(convert_ldm_clip_checkpoint(original))
    assert_same(read_through(CLIPNames(config), original), theirs, checkpoint_names(model.state_dict()))


# ---------------------------------------------------------------------- single module names

# (original / sgm name, diffusers name): modules, parameters, and names below a mapped module.
SDXL_BASE_MODULES = [
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("input_blocks.8.1.proj_in.weight", "down_blocks.2.attentions.1.proj_in.weight"),
    ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks.1.0", "down_blocks.0.resnets.0"),
    ("input_blocks.1.0.emb_layers.1", "down_blocks.0.resnets.0.time_emb_proj"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("middle_block.1", "mid_block.attentions.0"),
    ("middle_block.2.out_layers.3.bias", "mid_block.resnets.1.conv2.bias"),
    ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.5.1.transformer_blocks.1.ff.net.2", "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("out.2", "conv_out"),
]


@pytest.mark.parametrize("original,diffusers", SDXL_BASE_MODULES)
def test_single_unet_module_names_both_ways(original, diffusers):
    names = UNetNames(SINGLE_FILE_FAMILIES["sdxl-base"])
    assert names.to_diffusers(original) == diffusers
    assert names.to_source(diffusers) == original


def test_sd15_names_and_names_without_a_place():
    names = UNetNames(SINGLE_FILE_FAMILIES["sd15"])
    # SD 1.5's innermost level has no attention, so its upsampler is the entry's second part.
    assert names.to_diffusers("output_blocks.2.1.conv") == "up_blocks.0.upsamplers.0.conv"
    assert names.to_diffusers("output_blocks.11.1.norm") == "up_blocks.3.attentions.2.norm"
    for original in ("label_emb.0.0", "output_blocks.12.0", "input_blocks.12.0.op", "blocks.0"):
        assert names.to_diffusers(original) is None, original
    assert names.to_source("add_embedding.linear_1") is None


def test_single_vae_and_text_encoder_names_both_ways():
    vae = VAENames(VAEConfig.from_preset("sdxl"))
    for original, diffusers in [("decoder.up.3.block.0", "decoder.up_blocks.0.resnets.0"),
                                ("decoder.up.1.upsample.conv", "decoder.up_blocks.2.upsamplers.0.conv"),
                                ("encoder.mid.attn_1.proj_out", "encoder.mid_block.attentions.0.to_out.0"),
                                ("encoder.down.1.block.0.nin_shortcut", "encoder.down_blocks.1.resnets.0.conv_shortcut")]:
        assert (vae.to_diffusers(original), vae.to_source(diffusers)) == (diffusers, original)
    assert vae.to_diffusers("decoder.up.0.upsample.conv") is None  # the outermost level has none

    bigg = OpenCLIPNames(CLIPTextConfig.from_preset("sdxl-clip-bigg"))
    for original, diffusers in [("transformer.resblocks.3.mlp.c_fc", "text_model.encoder.layers.3.mlp.fc1"),
                                ("transformer.resblocks.31.attn", "text_model.encoder.layers.31.self_attn"),
                                ("transformer.resblocks.0.attn.out_proj", "text_model.encoder.layers.0.self_attn.out_proj"),
                                ("positional_embedding", "text_model.embeddings.position_embedding.weight")]:
        assert (bigg.to_diffusers(original), bigg.to_source(diffusers)) == (diffusers, original)
    # A third of the fused in_proj has no name of its own; the whole-file reading cuts it out.
    assert bigg.to_source("text_model.encoder.layers.3.self_attn.k_proj.weight") is None
    key = OPEN_CLIP_PREFIX["base"] + "transformer.resblocks.3.attn.in_proj_weight"
    assert {n: t.rows for n, t in bigg.parameters(key).items()} == {
        f"text_model.encoder.layers.3.self_attn.{p}_proj.weight": (i, 3) for i, p in enumerate("qkv")}
    assert bigg.to_diffusers("transformer.resblocks.32.attn") is None

    clip_l = CLIPNames(CLIPTextConfig.from_preset("sdxl-clip-l"))
    # transformers 5's bare names (as LoRA files for text encoders use) and 4.x's.
    assert clip_l.to_diffusers("encoder.layers.0.self_attn.q_proj") == "text_model.encoder.layers.0.self_attn.q_proj"
    assert clip_l.to_diffusers("text_model.final_layer_norm") == "text_model.final_layer_norm"
    assert clip_l.to_diffusers("text_model.embeddings.position_ids") is None
    assert clip_l.to_diffusers("text_projection.weight") is None  # ViT-L has no projection
