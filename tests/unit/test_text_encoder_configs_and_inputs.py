"""The text encoders' config, input checks and weight loading, without a reference library."""
import mlx.core as mx
import numpy as np
import pytest
from mlx_unet import ConfigError, InputError
from mlx_unet import CLIPTextConfig, CLIPTextModel


BAD_CONFIGS = [
    ("tiny-clip-l", {"hidden_act": "relu"}, "'hidden_act' = 'relu' is not supported"),
    ("tiny-clip-l", {"eos_token_id": [2, 49407]}, "'eos_token_id' must be one token id"),
    ("tiny-clip-l", {"eos_token_id": None}, "'eos_token_id' must be one token id"),
    ("tiny-clip-l", {"eos_token_id": 49408}, "'eos_token_id' must be one token id"),
    ("tiny-clip-l", {"num_attention_heads": 7}, "does not split into 7 attention heads"),
    ("tiny-clip-l", {"hidden_size": 0}, "'hidden_size' must be a positive integer"),
    ("tiny-clip-l", {"num_hidden_layers": True}, "'num_hidden_layers' must be a positive integer"),
    ("tiny-clip-l", {"layer_norm_eps": 0}, "'layer_norm_eps' must be a positive number"),
    ("tiny-clip-l", {"layer_norm_eps": None}, "'layer_norm_eps' must be a positive number"),
    ("tiny-clip-l", {"architectures": ["CLIPModel"]}, "'architectures'"),
    ("tiny-clip-l", {"architectures": None}, "'architectures'"),
    ("tiny-clip-l", {"model_type": "clip"}, "not a CLIP text encoder"),
    ("tiny-clip-bigg", {"projection_dim": None}, "'projection_dim' must be a positive integer"),
]


BAD_INPUTS = [
    (np.zeros((1, 5), np.int32), -2, "must be an mlx array"),
    (mx.zeros((1, 5)), -2, "integer token ids, got dtype mlx.core.float32"),
    (mx.zeros((5,), mx.int32), -2, r"input_ids\[None\]"),
    (mx.zeros((1, 0), mx.int32), -2, r"must be \(batch, tokens\)"),
    (mx.zeros((1, 78), mx.int32), -2, "78 tokens but this encoder takes at most 77"),
    (mx.array([[49406, 49408]]), -2, "token id 49408, outside"),
    (mx.array([[49406, -1]]), -2, "token id -1, outside"),
    (mx.zeros((1, 5), mx.int32), 4, "hidden_layer must be an int from -4 to 3"),
    (mx.zeros((1, 5), mx.int32), -5, "hidden_layer must be an int from -4 to 3"),
    (mx.zeros((1, 5), mx.int32), 1.0, "hidden_layer must be an int"),
    (mx.zeros((1, 5), mx.int32), True, "hidden_layer must be an int"),
]


def test_bare_model_ignores_projection_dim():
    config = CLIPTextConfig.from_preset("tiny-clip-l", projection_dim=None)
    assert not config.with_projection and "text_projection" not in CLIPTextModel(config)


def test_bad_config_values_are_refused():
    # One test for all cases: each test pays about half a second of memory release (conftest).
    for preset, overrides, match in BAD_CONFIGS:
        with pytest.raises(ConfigError, match=match):
            CLIPTextConfig.from_preset(preset, **overrides)


def test_bad_config_sources_are_refused(tmp_path):
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="must be a JSON object"):
        CLIPTextConfig.from_dict([])
    with pytest.raises(ConfigError, match="pass its 'text_config' entry"):
        CLIPTextConfig.from_dict({"model_type": "clip", "text_config": {}})
    with pytest.raises(ConfigError, match="unknown text encoder preset"):
        CLIPTextConfig.from_preset("sdxl-clip-h")
    with pytest.raises(ConfigError, match="no text encoder config"):
        CLIPTextConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CLIPTextConfig.from_json(tmp_path)


def test_bad_inputs_are_refused():
    model = CLIPTextModel(CLIPTextConfig.from_preset("tiny-clip-l"))
    for ids, hidden_layer, match in BAD_INPUTS:
        with pytest.raises(InputError, match=match):
            model(ids, hidden_layer)


