"""LoRA files read and grouped (mlx_unet.lora.formats, files) and every layout's module names
(mlx_unet.naming.lora): formats detected and named, each module's scale by the rule of the tools
that write it, and whatever cannot be applied refused by name. MLX and numpy only."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_unet import CLIPTextConfig, MlxUnetError, UNet2DConditionModel, UNetConfig, WeightsError
from mlx_unet.lora import Hadamard, Kronecker, LowRank, read_lora
from mlx_unet.lora import files as lora_files
from mlx_unet.lora.apply import text_encoder_layers
from mlx_unet.lora.layers import adaptable_layers
from mlx_unet.naming.lora import Target, part_of, unet_names

RNG = np.random.default_rng(0)


def _m(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _read(tmp_path, tensors, metadata=None, name="lora.safetensors"):
    save_file(tensors, str(tmp_path / name), metadata=metadata)
    return read_lora(tmp_path / name)


@pytest.fixture(scope="module")
def sdxl_paths():
    # Built lazily (no weights are evaluated): only the module tree is needed.
    unet = UNet2DConditionModel(UNetConfig.from_preset("sdxl-base"))
    return unet.config, [p for p, _ in adaptable_layers(unet)]


# ---------------------------------------------------------------------- names


@pytest.mark.parametrize("name, path", [
    # The issue's examples of sd-scripts' sgm names for SDXL, and the rest of its naming.
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_output_blocks_3_1_transformer_blocks_1_attn2_to_k", "up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    ("lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj", "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj"),
    ("lora_unet_middle_block_1_proj_in", "mid_block.attentions.0.proj_in"),
    ("lora_unet_middle_block_2_out_layers_3", "mid_block.resnets.1.conv2"),
    ("lora_unet_input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
    ("lora_unet_input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("lora_unet_output_blocks_5_0_emb_layers_1", "up_blocks.1.resnets.2.time_emb_proj"),
    ("lora_unet_input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
    ("lora_unet_output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
    ("lora_unet_output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
    ("lora_unet_time_embed_0", "time_embedding.linear_1"),
    ("lora_unet_time_embed_2", "time_embedding.linear_2"),
    ("lora_unet_label_emb_0_0", "add_embedding.linear_1"),
    ("lora_unet_label_emb_0_2", "add_embedding.linear_2"),
    ("lora_unet_input_blocks_0_0", "conv_in"),
    ("lora_unet_out_2", "conv_out"),
    # diffusers-like kohya names, PEFT, attention processors (with and without the unet prefix).
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_up_blocks_0_attentions_2_transformer_blocks_3_attn1_to_out_0", "up_blocks.0.attentions.2.transformer_blocks.3.attn1.to_out.0"),
    ("unet.down_blocks.2.attentions.1.transformer_blocks.4.ff.net.2", "down_blocks.2.attentions.1.transformer_blocks.4.ff.net.2"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    ("down_blocks.1.attentions.1.transformer_blocks.1.attn1.processor.to_v", "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_v"),
])
def test_every_unet_layout_names_the_layer(sdxl_paths, name, path):
    config, paths = sdxl_paths
    assert unet_names(config, paths)[name] == [Target("unet", path)]


def test_each_unet_layer_has_its_kohya_and_peft_names(sdxl_paths):
    config, paths = sdxl_paths
    names = unet_names(config, paths)
    for path in paths:
        assert names["lora_unet_" + path.replace(".", "_")] == [Target("unet", path)]
        assert names["unet." + path] == [Target("unet", path)]
    # No two layers share a name: a module of a file always updates one layer.
    assert all(len(targets) == 1 for targets in names.values())


def test_text_encoder_names_and_open_clip_fused_in_proj():
    config = CLIPTextConfig.from_preset("tiny-clip-bigg")
    names = text_encoder_layers(config, "text_encoder_2").names
    layer = "text_model.encoder.layers.1"
    for name in (f"lora_te2_text_model_encoder_layers_1_self_attn_k_proj", f"text_encoder_2.{layer}.self_attn.k_proj",
                 f"text_encoder_2.{layer}.self_attn.to_k"):
        assert names[name] == [Target("text_encoder_2", f"{layer}.self_attn.k_proj")]
    assert names["lora_te2_transformer_resblocks_1_mlp_c_fc"] == [Target("text_encoder_2", f"{layer}.mlp.fc1")]
    assert names["lora_te2_transformer_resblocks_1_attn_out_proj"] == [Target("text_encoder_2", f"{layer}.self_attn.out_proj")]
    assert names["lora_te2_transformer_resblocks_1_attn_in_proj"] == [
        Target("text_encoder_2", f"{layer}.self_attn.{p}", (i, 3)) for i, p in enumerate(("q_proj", "k_proj", "v_proj"))]
    first = text_encoder_layers(CLIPTextConfig.from_preset("tiny-clip-l"), "text_encoder").names
    # SD 1.x files name their one encoder lora_te_, SDXL files the first lora_te1_.
    assert first["lora_te_text_model_encoder_layers_0_mlp_fc2"] == first["lora_te1_text_model_encoder_layers_0_mlp_fc2"]


@pytest.mark.parametrize("module, part", [
    ("lora_unet_x", "unet"), ("lora_te_x", "text_encoder"), ("lora_te1_x", "text_encoder"), ("lora_te2_x", "text_encoder_2"),
    ("unet.x", "unet"), ("text_encoder.x", "text_encoder"), ("text_encoder_2.x", "text_encoder_2"), ("down_blocks.0", None)])
def test_part_of_a_module_name(module, part):
    assert part_of(module) == part


# ---------------------------------------------------------------------- formats and scales


def test_kohya_scales_by_alpha_over_rank_and_names_its_format(tmp_path):
    lora = _read(tmp_path, {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": _m(4, 8), "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": _m(8, 4),
        "lora_unet_input_blocks_4_1_proj_in.alpha": np.array(2.0, np.float32),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": _m(2, 8, 3, 3),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": _m(8, 2, 1, 1),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": _m(4, 8),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": _m(8, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": np.array([8.0], np.float16),  # one number, any dtype
    })
    assert lora.format == "kohya LoRA (sgm names, LoCon convolutions)"
    assert lora.parts == {"unet": 2, "text_encoder": 1}
    unet = lora.modules["unet"]
    assert unet["lora_unet_input_blocks_4_1_proj_in"].scale == 0.5
    assert unet["lora_unet_input_blocks_1_0_in_layers_2"].scale == 1.0  # no alpha: alpha = rank
    assert lora.modules["text_encoder"]["lora_te1_text_model_encoder_layers_0_mlp_fc1"].scale == 2.0


def test_peft_scales_from_diffusers_metadata(tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({
        "unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2},
        "text_encoder.r": 4, "text_encoder.lora_alpha": 16, "text_encoder.use_rslora": True})}
    tensors = {}
    for module in ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                   "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                   "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"):
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = _m(4, 8), _m(8, 4)
    lora = _read(tmp_path, tensors, meta)
    assert lora.format == "diffusers/PEFT LoRA"
    unet = lora.modules["unet"]
    assert unet["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].scale == 2.0  # 8 / 4
    assert unet["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].scale == 0.5  # pattern: 2 / 4
    assert lora.modules["text_encoder"]["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].scale == 8.0  # 16 / sqrt 4
    plain = _read(tmp_path, tensors, name="plain.safetensors")  # no metadata, no alpha: scale 1 (alpha = rank)
    assert {a.scale for part in plain.modules.values() for a in part.values()} == {1.0}


def test_older_diffusers_files(tmp_path):
    lora = _read(tmp_path, {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": _m(4, 8),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": _m(8, 4),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": _m(4, 8),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": _m(8, 4),
    })
    assert lora.format == "diffusers attention-processor LoRA"
    assert set(lora.modules["unet"]) == {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out"}


def test_lycoris_kinds_and_their_scales(tmp_path):
    lora = _read(tmp_path, {
        "lora_unet_a.hada_w1_a": _m(8, 4), "lora_unet_a.hada_w1_b": _m(4, 8), "lora_unet_a.hada_w2_a": _m(8, 4),
        "lora_unet_a.hada_w2_b": _m(4, 8), "lora_unet_a.alpha": np.array(2.0, np.float32),
        # LoKr: the rank is the decomposed factor's, w2's first ...
        "lora_unet_b.lokr_w1": _m(2, 2), "lora_unet_b.lokr_w2_a": _m(4, 3), "lora_unet_b.lokr_w2_b": _m(3, 4),
        "lora_unet_b.alpha": np.array(6.0, np.float32),
        "lora_unet_c.lokr_w1_a": _m(2, 5), "lora_unet_c.lokr_w1_b": _m(5, 2), "lora_unet_c.lokr_w2": _m(4, 4),
        "lora_unet_c.alpha": np.array(10.0, np.float32),
        # ... and with neither decomposed the scale is 1, whatever alpha says.
        "lora_unet_d.lokr_w1": _m(2, 2), "lora_unet_d.lokr_w2": _m(4, 4), "lora_unet_d.alpha": np.array(3.0, np.float32),
    })
    assert lora.format == "LyCORIS LoHa + LyCORIS LoKr"
    modules = lora.modules["unet"]
    assert isinstance(modules["lora_unet_a"], Hadamard) and modules["lora_unet_a"].scale == 0.5
    assert isinstance(modules["lora_unet_b"], Kronecker) and modules["lora_unet_b"].scale == 2.0
    assert modules["lora_unet_c"].scale == 2.0
    assert modules["lora_unet_d"].scale == 1.0
    assert modules["lora_unet_b"].sizes() == (8, 8)


def _refusal(tmp_path, tensors, *words, metadata=None):
    with pytest.raises(WeightsError) as caught:
        _read(tmp_path, tensors, metadata)
    message = str(caught.value)
    assert "\n" not in message and "lora.safetensors" in message, message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("suffix, kind", [
    (".dora_scale", "DoRA"), (".lora_magnitude_vector", "DoRA"), (".a1.weight", "GLoRA"), (".diff", ".diff"),
    (".lora_B.bias", "lora_bias"), (".oft_blocks", "OFT"), (".w_norm", ".w_norm")])
def test_other_adapters_are_refused_by_name(tmp_path, suffix, kind):
    tensors = {"lora_unet_a.lora_down.weight": _m(4, 8), "lora_unet_a.lora_up.weight": _m(8, 4), f"lora_unet_a{suffix}": _m(8)}
    _refusal(tmp_path, tensors, kind, f"lora_unet_a{suffix}")


def test_what_is_no_adapter_is_refused_never_ignored(tmp_path):
    pair = {"lora_unet_a.lora_down.weight": _m(4, 8), "lora_unet_a.lora_up.weight": _m(8, 4)}
    _refusal(tmp_path, {**pair, "lora_unet_a.weird_suffix": _m(2)}, "'lora_unet_a.weird_suffix'", "no LoRA")
    _refusal(tmp_path, {**pair, "bundle_emb.cat.string_to_param.*": _m(2, 8)}, "textual-inversion")
    _refusal(tmp_path, {"lora_unet_a.lora_down.weight": _m(4, 8)}, "lora_unet_a", "not a whole adapter")
    _refusal(tmp_path, {**pair, "lora_unet_b.alpha": np.array(1.0, np.float32)}, "alpha for lora_unet_b")
    _refusal(tmp_path, {**pair, "lora_unet_a.alpha": np.array([1.0, 2.0], np.float32)}, "one number")
    _refusal(tmp_path, {**pair, "lora_unet_a.alpha": np.array(np.inf, np.float32)}, "non-finite alpha")
    _refusal(tmp_path, {"unet.a.lora_A.weight": _m(4, 8), "unet.a.lora_B.weight": _m(8, 4)}, "DoRA",
             metadata={"lora_adapter_metadata": json.dumps({"unet.use_dora": True})})
    _refusal(tmp_path, {**pair, "lora_unet_a.lokr_w1": _m(2, 2)}, "not a whole")


def test_sources_folders_and_pickles(tmp_path, monkeypatch):
    tensors = {"lora_unet_a.lora_down.weight": _m(4, 8), "lora_unet_a.lora_up.weight": _m(8, 4)}
    folder = tmp_path / "saved"
    folder.mkdir()
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"))  # diffusers' save_lora_weights
    save_file(tensors, str(folder / "other.safetensors"))
    assert read_lora(folder).name == "pytorch_lora_weights.safetensors"
    (folder / "pytorch_lora_weights.safetensors").unlink()
    save_file(tensors, str(folder / "third.safetensors"))
    with pytest.raises(WeightsError, match="holds 2 weight files .*other.safetensors, third.safetensors.*weight_name"):
        read_lora(folder)
    assert read_lora(folder, weight_name="third.safetensors").parts == {"unet": 1}
    for name in ("lora.pt", "LORA.CKPT"):
        (tmp_path / name).write_bytes(b"\x80\x02")
        with pytest.raises(MlxUnetError, match="pickle.*--allow-pickle"):
            read_lora(tmp_path / name)
    with pytest.raises(WeightsError, match="does not exist"):
        read_lora("./missing/style.safetensors")


def test_hub_repo_ids_download_only_the_lora(tmp_path, monkeypatch):
    """Without network: huggingface_hub's listing and download replaced by stand-ins that record
    what was asked for."""
    tensors = {"lora_unet_a.lora_down.weight": _m(4, 8), "lora_unet_a.lora_up.weight": _m(8, 4)}
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    save_file(tensors, str(snapshot / "style_v2.safetensors"))
    asked = []
    monkeypatch.setattr(lora_files, "is_offline", lambda: False)
    monkeypatch.setattr(lora_files, "repo_files", lambda repo, revision: ["README.md", "style_v2.safetensors",
                                                                           "samples/a.safetensors"])
    monkeypatch.setattr(lora_files, "snapshot", lambda repo, revision, patterns, offline: asked.append(
        (repo, revision, patterns)) or snapshot)
    lora = read_lora("someone/style-lora", revision="v2")
    assert lora.parts == {"unet": 1} and asked == [("someone/style-lora", "v2", ["style_v2.safetensors"])]
    # Anything that looks like a path is one: reported missing at once, never looked up.
    with pytest.raises(WeightsError, match="does not exist"):
        read_lora("someone/style-lora.safetensors")
    assert len(asked) == 1


def test_adapters_check_their_own_factors():
    assert LowRank(mx.zeros((4, 8)), mx.zeros((8, 3)), 1.0).problem() is not None  # up's rank is not down's
    assert LowRank(mx.zeros((4, 8, 1, 1)), mx.zeros((8, 4, 1, 1)), 1.0, mid=mx.zeros((3, 4, 3, 3))).problem() is not None
    assert Hadamard(mx.zeros((8, 4)), mx.zeros((3, 8)), mx.zeros((8, 4)), mx.zeros((4, 8)), 1.0).problem() is not None
    assert Kronecker((mx.zeros((2, 3)), mx.zeros((4, 2))), mx.zeros((4, 4)), 1.0).problem() is not None
