"""UNetConfig: presets, diffusers' quirks, validation and refusal of what we do not implement."""

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from mlx.utils import tree_flatten

from mlx_unet import PRESETS, ConfigError, UNet2DConditionModel, UNetConfig
from mlx_unet.weights import torch_to_mlx_layout


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_parameter_names_and_shapes_match_diffusers(preset):
    """The whole point of mirroring diffusers: a converted checkpoint loads by plain key match."""
    config = UNetConfig.from_preset(preset)
    with torch.device("meta"):
        reference = TorchUNet(**config.to_diffusers_dict())
    # A zero-strided stand-in of each tensor's shape: meta tensors have no data to lay out.
    theirs = {k: torch_to_mlx_layout(np.broadcast_to(np.float32(0), v.shape)).shape
              for k, v in reference.state_dict().items()}
    ours = {k: v.shape for k, v in tree_flatten(UNet2DConditionModel(config).parameters())}
    assert ours.keys() == theirs.keys()
    assert {k: tuple(v) for k, v in ours.items()} == {k: tuple(v) for k, v in theirs.items()}


def test_sdxl_base_has_its_published_size():
    model = UNet2DConditionModel(UNetConfig.from_preset("sdxl-base"))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == 2_567_463_684


def test_head_counts_come_from_attention_head_dim():
    sd15 = UNetConfig.from_preset("sd15")
    assert sd15.num_attention_heads == (8, 8, 8, 8)  # 8 heads: head widths 40/80/160/160
    sdxl = UNetConfig.from_preset("sdxl-base")
    assert sdxl.num_attention_heads == (5, 10, 20)  # head width 64 everywhere
    model = UNet2DConditionModel(sdxl)
    attn = model.down_blocks[2].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 20 and attn.scale == 64**-0.5


def test_transformer_depths_per_level_and_reversed_for_up_blocks():
    c = UNetConfig.from_preset("sdxl-base")
    assert c.transformer_depths == ((1, 1), (2, 2), (10, 10))
    assert c.up_transformer_depths == ((10, 10, 10), (2, 2, 2), (1, 1, 1))
    assert c.mid_transformer_depth == 10
    refiner = UNetConfig.from_preset("sdxl-refiner")  # one int for every level
    assert refiner.transformer_depths == ((4, 4),) * 4 and refiner.mid_transformer_depth == 4


def test_from_json_reads_a_real_style_config(tmp_path):
    raw = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0", **PRESETS["sdxl-refiner"]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert UNetConfig.from_json(tmp_path) == UNetConfig.from_preset("sdxl-refiner")
    assert UNetConfig.from_json(tmp_path / "config.json").cross_attention_dim == 1280


@pytest.mark.parametrize("preset", list(PRESETS))
def test_round_trip_through_diffusers_field_names(preset):
    config = UNetConfig.from_preset(preset)
    assert UNetConfig.from_dict(config.to_diffusers_dict()) == config


@pytest.mark.parametrize(
    "field,value",
    [
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("time_cond_proj_dim", 256),
        ("resnet_time_scale_shift", "scale_shift"),
        ("dual_cross_attention", True),
        ("only_cross_attention", True),
        ("encoder_hid_dim", 1024),
        ("encoder_hid_dim_type", "text_proj"),
        ("attention_type", "gated"),
        ("time_embedding_type", "fourier"),
        ("time_embedding_act_fn", "silu"),
        ("timestep_post_act", "silu"),
        ("act_fn", "gelu"),
        ("num_attention_heads", 8),
        ("resnet_skip_time_act", True),
        ("class_embeddings_concat", True),
        ("cross_attention_norm", "group_norm"),
        ("addition_embed_type", "text"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ],
)
def test_unimplemented_values_are_refused_by_name(field, value):
    with pytest.raises(ConfigError) as err:
        UNetConfig.from_preset("sd15", **{field: value})
    assert repr(field) in str(err.value) and repr(value) in str(err.value)


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="'brand_new_option'"):
        UNetConfig.from_preset("sd15", brand_new_option=3)


def test_inert_fields_are_accepted():
    c = UNetConfig.from_preset("sd15", dropout=0.1, resnet_out_scale_factor=2.0, addition_embed_type_num_heads=32,
                               only_cross_attention=[False] * 4, mid_block_only_cross_attention=False)
    assert c == UNetConfig.from_preset("sd15", sample_size=64)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"down_block_types": ["DownBlock2D"] * 3}, "'down_block_types' has 3 entries but block_out_channels has 4"),
        ({"up_block_types": ["UpBlock2D"] * 3 + ["AttnUpBlock2D"]}, "'up_block_types' contains 'AttnUpBlock2D'"),
        ({"attention_head_dim": [8, 8]}, "'attention_head_dim' has 2 entries but the UNet has 4 levels"),
        ({"attention_head_dim": 7}, "320 channels do not split into 7 attention heads"),
        ({"norm_num_groups": 24}, "not divisible by norm_num_groups = 24"),
        ({"norm_num_groups": None}, "'norm_num_groups' = None"),
        ({"cross_attention_dim": [768, 768, 1024, 1024]}, "must be one width"),
        ({"layers_per_block": 0}, "'layers_per_block' must be a positive integer, got 0"),
        ({"conv_in_kernel": 4}, "'conv_in_kernel' = 4 must be odd"),
        ({"transformer_layers_per_block": [[1, 1], [1, 1], [1, 1], [1, 1]]}, "needs 'reverse_transformer_layers_per_block'"),
        ({"transformer_layers_per_block": [[1], [1, 1], [1, 1], [1, 1]],
          "reverse_transformer_layers_per_block": [[1, 1, 1]] * 4}, "'transformer_layers_per_block'[0] has 1 entries for 2 layers"),
        ({"addition_embed_type": "text_time"}, "'addition_time_embed_dim' must be a positive integer, got None"),
        ({"downsample_padding": 2}, "'downsample_padding' = 2 must be 0 or 1"),
    ],
)
def test_invalid_configs_say_what_is_wrong(changes, message):
    with pytest.raises(ConfigError) as err:
        UNetConfig.from_preset("sd15", **changes)
    assert message in str(err.value)


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(ConfigError, match="no UNet config at"):
        UNetConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        UNetConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        UNetConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="unknown UNet preset 'sd3'"):
        UNetConfig.from_preset("sd3")
