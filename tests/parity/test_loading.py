"""from_pretrained on MLX weight folders, and the errors for weights that do not fit."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from reference import make_inputs, mlx_weights, relative_error, run_mlx, run_torch, tiny_config, torch_unet

from mlx_unet import ConfigError, UNet2DConditionModel, WeightsError, cpu
from mlx_unet.finite import all_finite, stored_finite
from mlx_unet.weights import load_weights, weight_layouts


@pytest.fixture(scope="module")
def reference():
    config = tiny_config("sd15")
    return config, torch_unet(config, seed=11)


def write_folder(path, config, weights, shards=1):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_diffusers_dict()))
    names = sorted(weights)
    for i in range(shards):
        part = {k: weights[k] for k in names[i::shards]}
        mx.save_safetensors(str(path / f"model-{i:05d}.safetensors"), part)
    return path


@pytest.mark.parametrize("shards", [1, 3])
def test_from_pretrained_matches_diffusers(tmp_path, reference, shards):
    config, model = reference
    folder = write_folder(tmp_path / "unet", config, mlx_weights(model.state_dict()), shards)
    ours = UNet2DConditionModel.from_pretrained(folder)
    inputs = make_inputs(config, 2, 16, 16, timesteps=[5.0, 800.0])
    assert relative_error(run_mlx(ours, inputs), run_torch(model, inputs)) <= 1e-4


def test_from_pretrained_casts_dtype(tmp_path, reference):
    config, model = reference
    folder = write_folder(tmp_path / "unet", config, mlx_weights(model.state_dict()))
    ours = UNet2DConditionModel.from_pretrained(folder, dtype=mx.float16)
    assert {v.dtype for _, v in tree_flatten(ours.parameters())} == {mx.float16, cpu.computes_in(mx.float16)}
    plain = UNet2DConditionModel.from_pretrained(folder, dtype=mx.float16, cpu_kernels=False)
    assert {v.dtype for _, v in tree_flatten(plain.parameters())} == {mx.float16}


def row_major_strides(shape, item):
    return tuple(item * int(np.prod(shape[i + 1:])) for i in range(len(shape)))


@pytest.mark.cpu_only
@pytest.mark.parametrize("stored,dtype", [(mx.float32, None), (mx.float32, mx.float16), (mx.bfloat16, None),
                                          (mx.float16, mx.float32)])
def test_weights_are_laid_out_for_the_cpu(tmp_path, reference, stored, dtype):
    """On the CPU, convolution weights keep diffusers' names, shapes and values but lie in memory
    as their module computes with them: a kernel (out, kh, kw, in) as (kh, kw, in, out) (conv.py).
    Every other parameter, a Linear's weight included (linear.py), is row-major. Files of every
    stored dtype load so, cast or not; the kernels' weights in that dtype, the rest of a
    half-precision model in float32 (cpu/widen.py). Loading empties the dict it is given, tensor
    by tensor."""
    config, model = reference
    weights = {k: v.astype(stored) for k, v in mlx_weights(model.state_dict()).items()}
    expected = {k: np.array(v.astype(dtype or v.dtype).astype(mx.float32)) for k, v in weights.items()}
    # The kernels asked for by name: MLX_UNET_CPU_KERNELS=0 in the environment would leave them out.
    ours = UNet2DConditionModel.from_pretrained(write_folder(tmp_path / "u", config, weights), dtype=dtype,
                                                cpu_kernels=True)
    layouts = weight_layouts(ours)
    assert "conv_in.weight" in layouts and "down_blocks.0.resnets.0.conv1.weight" in layouts
    assert not any(".ff.net.0.proj.weight" in k for k in layouts)
    assert "down_blocks.0.resnets.0.norm1.weight" not in layouts
    laid_out = 0
    kernel_weights = {f"{path}.weight" for path, layer in ours.named_modules() if cpu.is_accelerated(layer)}
    for name, value in tree_flatten(ours.parameters()):
        assert value.dtype == ((dtype or stored) if name in kernel_weights else mx.float32), name
        assert np.array_equal(np.array(value.astype(mx.float32)), expected[name]), name
        item, strides = value.itemsize, memoryview(value).strides
        if name in layouts:
            out, kh, kw, inp = value.shape
            assert strides == (item, item * kw * inp * out, item * inp * out, item * out), name
        else:
            assert strides == row_major_strides(value.shape, item), name
        laid_out += name in layouts
    assert laid_out == len(layouts)
    # Weights loaded into a model that already has the kernels are laid out as they arrive.
    fresh = cpu.accelerate(UNet2DConditionModel(config))
    load_weights(fresh, weights)
    assert weights == {}
    item = stored.size
    assert memoryview(fresh.conv_in.weight).strides[0] == item
    linear = fresh.time_embedding.linear_1.weight
    assert memoryview(linear).strides == row_major_strides(linear.shape, item)


def test_plain_code_path_keeps_mlx_layers_and_row_major_weights(tmp_path, reference, monkeypatch):
    """``cpu_kernels=False`` and ``MLX_UNET_CPU_KERNELS=0`` both load the plain MLX model (the
    code Metal and CUDA run); that by default the CPU gets the kernels is tests/unit/test_cpu_swap.py's."""
    config, model = reference
    folder = write_folder(tmp_path / "u", config, mlx_weights(model.state_dict()))
    plain = UNet2DConditionModel.from_pretrained(folder, cpu_kernels=False)
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    from_env = UNet2DConditionModel.from_pretrained(folder)
    for ours in (plain, from_env):
        assert type(ours.conv_in) is nn.Conv2d and type(ours.time_embedding.linear_1) is nn.Linear
        assert weight_layouts(ours) == {}
        for name, value in tree_flatten(ours.parameters()):
            assert memoryview(value).strides == row_major_strides(value.shape, value.itemsize), name


def test_loaded_parameters_all_reach_the_output(tmp_path, reference):
    """Perturb one loaded tensor at a time: each must change the output (no dead parameters)."""
    config, model = reference
    weights = mlx_weights(model.state_dict())
    ours = UNet2DConditionModel(config)
    inputs = make_inputs(config, 1, 8, 8)
    base = run_mlx(UNet2DConditionModel.from_pretrained(write_folder(tmp_path / "u", config, weights)), inputs)
    rng = np.random.default_rng(0)
    for name in rng.choice(sorted(weights), 25, replace=False):
        changed = dict(weights, **{name: weights[name] + 0.5})
        ours.update(tree_unflatten(list(changed.items())))
        assert np.abs(run_mlx(ours, inputs) - base).max() > 0, name


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, reference):
    config, model = reference
    weights = mlx_weights(model.state_dict())
    del weights["conv_in.bias"]
    del weights["mid_block.resnets.1.norm2.weight"]
    weights["down_blocks.9.resnets.0.conv1.weight"] = mx.zeros((1,))
    weights["conv_out.bias"] = mx.zeros((5,))
    folder = write_folder(tmp_path / "unet", config, weights)
    with pytest.raises(WeightsError) as err:
        UNet2DConditionModel.from_pretrained(folder)
    text = str(err.value)
    assert "2 missing (conv_in.bias, mid_block.resnets.1.norm2.weight)" in text
    assert "1 unexpected (down_blocks.9.resnets.0.conv1.weight)" in text
    assert "1 with the wrong shape (conv_out.bias; conv_out.bias is (5,), expected (4,))" in text


def test_many_missing_keys_are_counted_not_all_listed(tmp_path, reference):
    config, model = reference
    weights = {k: v for k, v in mlx_weights(model.state_dict()).items() if not k.startswith("up_blocks")}
    with pytest.raises(WeightsError, match=r"\d+ missing \(up_blocks.*, \.\.\. \(\d+ more\)\)"):
        UNet2DConditionModel.from_pretrained(write_folder(tmp_path / "u", config, weights))


def test_pytorch_layout_checkpoint_gets_a_hint(tmp_path, reference):
    config, model = reference
    raw = {k: mx.array(v.numpy()) for k, v in model.state_dict().items()}  # OIHW convolutions
    with pytest.raises(WeightsError, match="OIHW layout, convert the checkpoint with convert.py"):
        UNet2DConditionModel.from_pretrained(write_folder(tmp_path / "u", config, raw))


def test_config_of_another_model_is_caught(tmp_path, reference):
    _, model = reference
    other = tiny_config("sd2")
    with pytest.raises(WeightsError, match="Check that config.json belongs to these weights"):
        UNet2DConditionModel.from_pretrained(write_folder(tmp_path / "u", other, mlx_weights(model.state_dict())))


def test_bad_folders(tmp_path, reference):
    config, model = reference
    with pytest.raises(ConfigError, match="no UNet config at"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config.to_diffusers_dict()))
    with pytest.raises(WeightsError, match="no .safetensors weights in"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage")
    with pytest.raises(WeightsError, match="is not a safetensors file"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_tensor_repeated_across_shards_is_refused(tmp_path, reference):
    config, model = reference
    weights = mlx_weights(model.state_dict())
    folder = write_folder(tmp_path / "u", config, weights)
    mx.save_safetensors(str(folder / "extra.safetensors"), {"conv_in.bias": weights["conv_in.bias"]})
    with pytest.raises(WeightsError, match=r"repeats tensors already loaded from another file \(conv_in.bias\)"):
        UNet2DConditionModel.from_pretrained(folder)


@pytest.mark.parametrize("stored", ["F16", "BF16", "F32"])
def test_the_finite_check_finds_every_nonfinite_value(stored):
    """Floats are checked by their bits: every NaN and inf, of either sign, is caught, and the
    extremes that are finite (the largest, the smallest subnormal, -0) pass."""
    dtype = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}[stored]
    info = mx.finfo(dtype)
    finite = mx.array([0.0, -0.0, 1.0, info.max, info.min, 2.0 ** -133 if stored == "BF16" else 2.0 ** -24], dtype)

    def stored_as(array: mx.array) -> np.ndarray:  # what the reader gives: half precision as its bits
        return np.array(array.view(mx.uint16) if stored == "BF16" else array)

    assert stored_finite(stored_as(finite), stored) and stored_finite(stored_as(finite[:0]), stored)
    # all_finite checks MLX arrays the same way (a converted tensor, say): strided views too.
    assert all_finite(finite).item() and all_finite(finite[:0]).item()
    assert all_finite(mx.broadcast_to(finite, (3, 6)).T).item()
    for bad in (mx.nan, mx.inf, -mx.inf, -mx.nan):
        for at in (0, 3, 5):
            values = mx.concatenate([finite[:at], mx.array([bad], dtype), finite[at:]])
            assert not stored_finite(stored_as(values), stored), (bad, at)
            assert not all_finite(values).item() and not all_finite(mx.tile(values, (2, 1)).T).item(), (bad, at)
