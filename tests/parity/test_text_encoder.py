"""SDXL's two CLIP text encoders against transformers' on the same seeded weights and token ids;
their config, input checks and weights loading."""

import copy
import json
import time

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from reference import relative_error, release_memory
from reference_text import mlx_text_encoder, run_torch, token_ids, torch_text_class, torch_text_encoder
from safetensors.numpy import load_file
from transformers import CLIPTextConfig as TorchCLIPTextConfig

from mlx_unet import CLIPTextConfig, CLIPTextModel, WeightsError, cpu
from mlx_unet.configs.clip import TEXT_PRESETS
from mlx_unet.naming.clip import checkpoint_names
from mlx_unet.weights import load_weights

FP32_BOUND = 1e-4
# Float16 rounds every weight and activation to 11 significant bits (relative 2**-11 = 4.9e-4),
# and the roundings compound over the layers: measured 0.8-1.7e-3 at tiny width, and 2.3e-3 (ViT-L)
# and 3.3e-3 (bigG, 32 layers) at full size, against the float32 reference.
FP16_BOUND = 4e-3

# Both architectures under both pooling rules: SDXL's legacy eos_token_id 2 (pool at the largest
# id) and the current one (pool at the first eos_token_id; 320 is not the largest id, so the two
# rules pool at different tokens of the same ids).
TINY = {
    "clip-l": ("tiny-clip-l", {}),  # quick_gelu, no projection
    "bigg": ("tiny-clip-bigg", {}),  # gelu, text_projection 40 -> 24
    "clip-l-eos": ("tiny-clip-l", {"eos_token_id": 320}),
    "bigg-eos": ("tiny-clip-bigg", {"eos_token_id": 320}),
}


def _errors(ours: tuple[mx.array, mx.array], hidden: np.ndarray, pooled: np.ndarray) -> tuple[float, float]:
    return tuple(relative_error(np.array(x.astype(mx.float32)), ref) for x, ref in zip(ours, (hidden, pooled)))


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    preset, overrides = TINY[request.param]
    config = CLIPTextConfig.from_preset(preset, **overrides)
    reference = torch_text_encoder(config, seed=1)
    return request.param, config, reference


@pytest.mark.usefixtures("code_path")
def test_fp32_matches_transformers_at_every_hidden_layer(tiny):
    name, config, reference = tiny
    ours = mlx_text_encoder(reference.state_dict(), config)
    n = config.num_hidden_layers
    for batch, length in ((3, 77), (2, 16)):
        ids = token_ids(config, batch, length, seed=length)
        hidden_states, pooled = run_torch(reference, ids)
        for hidden_layer in (-2, -1, 0, 1, n, -n - 1):
            errors = _errors(ours(mx.array(ids), hidden_layer), hidden_states[hidden_layer], pooled)
            print(f"\n{name} ({batch}, {length}) hidden_layer {hidden_layer}: "
                  f"hidden {errors[0]:.1e}, pooled {errors[1]:.1e}", end="")
            assert max(errors) <= FP32_BOUND, (batch, length, hidden_layer)


@pytest.mark.usefixtures("code_path")
def test_fp16_weights_and_activations(tiny):
    name, config, reference = tiny
    ids = token_ids(config, 3, 77, seed=5)
    hidden_states, pooled = run_torch(reference, ids)
    ours = mlx_text_encoder(reference.state_dict(), config, mx.float16)
    outputs = ours(mx.array(ids))
    assert all(x.dtype == cpu.computes_in(mx.float16) and bool(mx.all(mx.isfinite(x))) for x in outputs)
    errors = _errors(outputs, hidden_states[-2], pooled)
    print(f"\n{name} float16: hidden {errors[0]:.1e}, pooled {errors[1]:.1e}", end="")
    assert max(errors) <= FP16_BOUND


@pytest.mark.usefixtures("code_path")
def test_bf16_is_as_close_to_float32_as_transformers_bf16(tiny):
    """bfloat16 keeps 8 bits: the bound is what transformers itself loses in bfloat16 (computed
    here against its float32 forward), with a factor 2 of slack."""
    name, config, reference = tiny
    ids = token_ids(config, 3, 77, seed=6)
    hidden_states, pooled = run_torch(reference, ids)
    theirs_hidden, theirs_pooled = run_torch(copy.deepcopy(reference).to(torch.bfloat16), ids)
    theirs = _errors((mx.array(theirs_hidden[-2]), mx.array(theirs_pooled)), hidden_states[-2], pooled)
    outputs = mlx_text_encoder(reference.state_dict(), config, mx.bfloat16)(mx.array(ids))
    assert all(x.dtype == cpu.computes_in(mx.bfloat16) for x in outputs)
    ours = _errors(outputs, hidden_states[-2], pooled)
    print(f"\n{name} bfloat16: ours {ours}, transformers {theirs}", end="")
    assert ours[0] <= 2 * theirs[0] and ours[1] <= 2 * theirs[1]


@pytest.mark.slow
@pytest.mark.xdist_group("full_size")
@pytest.mark.parametrize("preset,batch", [("sdxl-clip-l", 2), ("sdxl-clip-bigg", 1)])
def test_fp32_full_size_matches_transformers(preset, batch):
    """The published architectures, once each, with the hidden state SDXL uses (-2)."""
    start = time.perf_counter()
    config = CLIPTextConfig.from_preset(preset)
    reference = torch_text_encoder(config, seed=7)
    ids = token_ids(config, batch, config.max_position_embeddings, seed=8)
    hidden_states, pooled = run_torch(reference, ids)
    hidden = hidden_states[-2]
    state = reference.state_dict()
    del reference, hidden_states
    release_memory()  # the torch model goes before ours is built: bigG is 2.8 GB in float32
    errors = _errors(mlx_text_encoder(state, config)(mx.array(ids)), hidden, pooled)
    print(f"\n{preset} full size: hidden {errors[0]:.1e}, pooled {errors[1]:.1e} "
          f"({time.perf_counter() - start:.0f} s)", end="")
    assert max(errors) <= FP32_BOUND


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize("preset", list(TEXT_PRESETS))
def test_preset_parameter_names_and_shapes_match_transformers(preset):
    config = CLIPTextConfig.from_preset(preset)
    with torch.device("meta"):
        reference = torch_text_class(config)(TorchCLIPTextConfig(**config.to_transformers_dict()))
    theirs = {k: tuple(v.shape) for k, v in checkpoint_names(reference.state_dict()).items()}
    ours = {k: tuple(v.shape) for k, v in tree_flatten(CLIPTextModel(config).parameters())}
    assert ours == theirs
    # The config survives transformers' names and JSON.
    assert CLIPTextConfig.from_dict(json.loads(json.dumps(config.to_transformers_dict()))) == config


def test_missing_fields_take_transformers_defaults():
    ours = CLIPTextConfig.from_dict({"architectures": ["CLIPTextModel"]}).to_transformers_dict()
    theirs = TorchCLIPTextConfig().to_dict()
    for key in ours.keys() - {"architectures"}:
        assert ours[key] == theirs[key], key


# ---------------------------------------------------------------------- input checks


# ---------------------------------------------------------------------- weights


def _save_folder(model: CLIPTextModel, folder) -> dict[str, mx.array]:
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(model.config.to_transformers_dict()))
    return weights


def test_missing_and_unconverted_keys_are_refused(tmp_path):
    config = CLIPTextConfig.from_preset("tiny-clip-bigg")
    weights = _save_folder(CLIPTextModel(config), tmp_path)
    del weights["text_projection.weight"]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    with pytest.raises(WeightsError, match=r"1 missing \(text_projection.weight\)"):
        CLIPTextModel.from_pretrained(tmp_path)
    # A pre-4.31 checkpoint holds the position_ids buffer: the converter must drop it.
    old = {**weights, "text_model.embeddings.position_ids": mx.arange(77)[None]}
    with pytest.raises(WeightsError, match=r"unexpected \(text_model.embeddings.position_ids\)"):
        load_weights(CLIPTextModel(config), old)
    assert "text_model.embeddings.position_ids" not in checkpoint_names(old)


def test_weights_round_trip_through_a_safetensors_folder(tmp_path):
    config = CLIPTextConfig.from_preset("tiny-clip-bigg")
    model = mlx_text_encoder(torch_text_encoder(config, seed=3).state_dict(), config)
    _save_folder(model, tmp_path)
    ids = mx.array(token_ids(config, 2, 77, seed=4))
    loaded = CLIPTextModel.from_pretrained(tmp_path)
    assert loaded.config == config
    for theirs, ours in zip(model(ids), loaded(ids)):
        np.testing.assert_array_equal(np.array(theirs), np.array(ours))
    half = CLIPTextModel.from_pretrained(tmp_path, dtype=mx.float16)
    assert half.dtype == cpu.computes_in(mx.float16) and half.text_projection.weight.dtype == mx.float16


@pytest.mark.parametrize("preset", ["tiny-clip-l", "tiny-clip-bigg"])
def test_transformers_saved_checkpoint_loads_by_checkpoint_names(preset, tmp_path):
    """What a converter does with transformers' own files (transformers 5 writes a bare
    CLIPTextModel without the text_model. prefix): rename, then a plain key match."""
    config = CLIPTextConfig.from_preset(preset)
    reference = torch_text_encoder(config, seed=9)
    reference.save_pretrained(tmp_path)
    assert CLIPTextConfig.from_json(tmp_path) == config
    ours = CLIPTextModel(config)
    load_weights(ours, {k: mx.array(v) for k, v in checkpoint_names(load_file(tmp_path / "model.safetensors")).items()})
    ids = token_ids(config, 2, 77, seed=10)
    hidden_states, pooled = run_torch(reference, ids)
    assert max(_errors(ours(mx.array(ids)), hidden_states[-2], pooled)) <= FP32_BOUND
