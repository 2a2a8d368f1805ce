"""The configs: UNetConfig's presets and diffusers' quirks, and the rule every config kind follows
(validation, refusal of what we do not implement, bookkeeping keys, the mlx_unet section)."""

import json

import pytest
from mlx.utils import tree_flatten

from mlx_unet import PRESETS, CLIPTextConfig, ConfigError, UNet2DConditionModel, UNetConfig, VAEConfig
from mlx_unet.configs.base import FORMAT_VERSION
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG, EulerDiscreteScheduler


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


# ---------------------------------------------------------------------- all config kinds
# One rule for the UNet, VAE, CLIP text and scheduler configs: bookkeeping keys accepted, values we
# do not implement refused by name, unknown keys refused, our mlx_unet section checked.

KINDS = {
    "unet": (lambda **kw: UNetConfig.from_preset("tiny", **kw), ("act_fn", "gelu")),
    "vae": (lambda **kw: VAEConfig.from_preset("tiny", **kw), ("shift_factor", 0.1159)),
    "clip": (lambda **kw: CLIPTextConfig.from_preset("tiny-clip-l", **kw), ("hidden_act", "relu")),
    "scheduler": (lambda **kw: EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG, **kw).config,
                  ("interpolation_type", "log_linear")),
}
BOOKKEEPING = {"_diffusers_version": "0.42.1", "_name_or_path": "org/model", "_commit_hash": "0" * 40,
               "transformers_version": "4.32.0", "torch_dtype": "float16", "dtype": "bfloat16"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_config_kind_accepts_bookkeeping_keys(kind):
    build, _ = KINDS[kind]
    assert build(**BOOKKEEPING) == build()


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_config_kind_refuses_an_unimplemented_value_by_name(kind):
    build, (field, value) = KINDS[kind]
    with pytest.raises(ConfigError) as err:
        build(**{field: value})
    assert f"{field!r} = {value!r}" in str(err.value) and "supported" in str(err.value)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_config_kind_refuses_unknown_keys_by_name(kind):
    build, _ = KINDS[kind]
    with pytest.raises(ConfigError) as err:
        build(quantization_config={"bits": 4})
    assert "'quantization_config'" in str(err.value) and "{'bits': 4}" in str(err.value)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_config_kind_checks_the_mlx_unet_section(kind):
    build, _ = KINDS[kind]
    assert build(mlx_unet={"format_version": FORMAT_VERSION}) == build()
    with pytest.raises(ConfigError, match=r"newer mlx-unet .*upgrade mlx-unet"):
        build(mlx_unet={"format_version": str(int(FORMAT_VERSION) + 1), "quantization": {"bits": 4}})
    with pytest.raises(ConfigError, match=r"'mlx_unet' holds 'pruning' = \{'ratio': 0.5\}"):
        build(mlx_unet={"format_version": FORMAT_VERSION, "pruning": {"ratio": 0.5}})
    with pytest.raises(ConfigError, match=r"quantization must hold bits, group_size and mode, got \{'bits': 4\}"):
        build(mlx_unet={"format_version": FORMAT_VERSION, "quantization": {"bits": 4}})
    with pytest.raises(ConfigError, match="affine quantization takes 8 or 4 bits, got 3"):
        build(mlx_unet={"format_version": FORMAT_VERSION, "quantization": {"bits": 3, "group_size": 64,
                                                                             "mode": "affine"}})
    quantized = {"format_version": FORMAT_VERSION, "quantization": {"bits": 4, "group_size": 64, "mode": "affine"}}
    assert build(mlx_unet=quantized) == build()
    for bad in ({}, {"format_version": 1}, {"format_version": "0"}):
        with pytest.raises(ConfigError, match="format_version"):
            build(mlx_unet=bad)
    with pytest.raises(ConfigError, match="'mlx_unet' must be an object"):
        build(mlx_unet="1")


@pytest.mark.parametrize("cls,preset", [(UNetConfig, "tiny"), (VAEConfig, "tiny"), (CLIPTextConfig, "tiny-clip-bigg")])
def test_to_dict_writes_the_section_and_reads_back(cls, preset):
    config = cls.from_preset(preset)
    written = config.to_dict()
    assert written["mlx_unet"] == {"format_version": FORMAT_VERSION}
    assert cls.from_dict(json.loads(json.dumps(written))) == config
    # Folders written before the section existed still load.
    assert cls.from_dict(config.library_dict()) == config


# A text_encoder/config.json as transformers 4.2x wrote it (SD 1.5's): every generation setting
# of PretrainedConfig, none of which a text encoder reads.
TRANSFORMERS_4_KEYS = {
    "_name_or_path": "openai/clip-vit-large-patch14", "add_cross_attention": False, "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bad_words_ids": None, "begin_suppress_tokens": None, "bos_token_id": 0,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "dropout": 0.0, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "eos_token_id": 2, "exponential_decay_length_penalty": None,
    "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "hidden_act": "quick_gelu",
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "initializer_factor": 1.0, "initializer_range": 0.02,
    "is_decoder": False, "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "layer_norm_eps": 1e-05, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
    "model_type": "clip_text_model", "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "pad_token_id": 1, "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "suppress_tokens": None, "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False,
    "tie_encoder_decoder": False, "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0,
    "torch_dtype": "float16", "torchscript": False, "transformers_version": "4.25.1", "typical_p": 1.0,
    "use_bfloat16": False,
}


def test_clip_accepts_what_transformers_4_wrote_and_refuses_pruned_heads():
    base = CLIPTextConfig.from_preset("tiny-clip-l")
    assert CLIPTextConfig.from_dict({**TRANSFORMERS_4_KEYS, **base.to_transformers_dict()}) == base
    with pytest.raises(ConfigError, match=r"'pruned_heads' = \{'0': \[1\]\}"):
        CLIPTextConfig.from_preset("tiny-clip-l", pruned_heads={"0": [1]})


# ---------------------------------------------------------------------- VAE latent scaling


def test_vae_latents_are_scaled_by_scaling_factor_only():
    """diffusers' SDXL pipelines divide latents by scaling_factor and ignore shift_factor (SD3's and
    Flux's add it), so does ours: a VAE that sets it is refused, by name, rather than run wrongly."""
    assert VAEConfig.from_preset("sdxl", shift_factor=None) == VAEConfig.from_preset("sdxl")
    assert "shift_factor" not in vars(VAEConfig.from_preset("sdxl"))
    for field, value in (("shift_factor", 0.0609), ("shift_factor", 0.0), ("latents_mean", [0.0] * 4),
                         ("latents_std", [1.0] * 4)):
        with pytest.raises(ConfigError) as err:
            VAEConfig.from_preset("sdxl", **{field: value})
        assert f"{field!r} = {value!r}" in str(err.value)
