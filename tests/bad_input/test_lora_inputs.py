"""``generate --lora``: what a user passes gets one sentence and exit code 2 before any image is
made (a missing file, a bad strength, a LoRA for another family, an adapter kind we do not apply,
a pickle, a damaged file), nothing is written, no source changes; a good one is applied and named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bad_input_helpers import PROMPT, RUN, assert_user_error, run_cli, run_in_process, tree_digest
from safetensors.numpy import save_file

from mlx_unet import UNet2DConditionModel
from mlx_unet.lora.layers import adaptable_layers, torch_shape


def _kohya(path, unet, rank=2, size=0.3, seed=0, width_of_text=None):
    """A kohya LoRA on every layer of ``unet``; ``width_of_text``: the cross-attention keys and
    values take that width instead (a LoRA made for another family)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer_path, layer in adaptable_layers(unet):
        shape = torch_shape(layer)
        if width_of_text and layer_path.endswith(("attn2.to_k", "attn2.to_v")):
            shape = (shape[0], width_of_text)
        name = "lora_unet_" + layer_path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, *shape[1:])) * size / 8).astype(np.float32)
        up = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        tensors[f"{name}.lora_up.weight"] = (rng.standard_normal(up) * size).astype(np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def unet(tiny_pipeline):
    return UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")


def _generate(tiny_pipeline, out, *args):
    return run_cli("generate", PROMPT, "--model", str(tiny_pipeline), "-o", str(out), *RUN, *args)


def test_a_good_lora_is_applied_and_named(tiny_pipeline, unet, tmp_path):
    lora = _kohya(tmp_path / "style.safetensors", unet)
    plain, fused, live = (tmp_path / f"{n}.png" for n in ("plain", "fused", "live"))
    # float32: fused and live round differently in half precision.
    exact = ("--dtype", "float32")
    assert _generate(tiny_pipeline, plain, *exact).returncode == 0
    run = run_cli("generate", PROMPT, "--model", str(tiny_pipeline), "-o", str(fused), *RUN[:-1], *exact,
                  "--lora", f"{lora}:0.8")
    assert run.returncode == 0, run.stderr
    assert "LoRA style.safetensors: kohya LoRA (LoCon convolutions)" in run.stderr and "scale 0.8, fused" in run.stderr
    assert _generate(tiny_pipeline, live, *exact, "--lora", f"{lora}:0.8", "--lora-mode", "live").returncode == 0
    from PIL import Image

    images = [np.asarray(Image.open(p)).astype(int) for p in (plain, fused, live)]
    assert np.abs(images[1] - images[0]).max() > 8  # the LoRA changes the picture
    assert np.abs(images[2] - images[1]).max() <= 1  # live and fused agree


@pytest.mark.parametrize("case", ["missing", "scale", "family", "dora", "pickle", "damaged", "no-match"])
def test_bad_loras_are_one_sentence_before_any_image(tiny_pipeline, unet, tmp_path, case):
    path = tmp_path / "in" / "lora.safetensors"
    path.parent.mkdir()
    spec = str(path)
    if case == "missing":
        words = ("the LoRA", "does not exist")
    elif case == "scale":
        _kohya(path, unet)
        spec, words = f"{path}:inf", ("a LoRA scale must be a finite number", "inf")
    elif case == "family":
        _kohya(path, unet, width_of_text=768)
        words = ("lora.safetensors is a LoRA for SD 1.x (768-wide text), and this UNet is",)
    elif case == "dora":
        _kohya(path, unet)
        tensors = {"lora_unet_conv_in.lora_down.weight": np.ones((2, 4, 3, 3), np.float32),
                   "lora_unet_conv_in.lora_up.weight": np.ones((32, 2, 1, 1), np.float32),
                   "lora_unet_conv_in.dora_scale": np.ones((32, 1, 1, 1), np.float32)}
        save_file(tensors, str(path))
        words = ("DoRA", "lora_unet_conv_in.dora_scale")
    elif case == "pickle":
        path = path.with_suffix(".pt")
        torch.save({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3)}, path)
        spec, words = str(path), ("PyTorch pickle", "--allow-pickle")
    elif case == "damaged":
        _kohya(path, unet)
        path.write_bytes(path.read_bytes()[:-10])
        words = ("lora.safetensors is truncated",)
    else:
        save_file({"lora_unet_down_blocks_7_x.lora_down.weight": np.ones((2, 4), np.float32),
                   "lora_unet_down_blocks_7_x.lora_up.weight": np.ones((4, 2), np.float32)}, str(path))
        words = ("none of the 1 modules of lora.safetensors", "names a layer of this model")
    before = tree_digest(path.parent)
    out = tmp_path / "out" / "image.png"
    out.parent.mkdir()
    proc = run_in_process("generate", PROMPT, "--model", str(tiny_pipeline), "-o", str(out), *RUN, "--lora", spec)
    assert_user_error(proc, *words)
    assert list(out.parent.iterdir()) == [] and tree_digest(path.parent) == before


def test_modules_that_name_no_layer_are_one_warning_line(tiny_pipeline, unet, tmp_path):
    path = _kohya(tmp_path / "lora.safetensors", unet)
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    tensors["lora_unet_down_blocks_7_x.lora_down.weight"] = np.ones((2, 4), np.float32)
    tensors["lora_unet_down_blocks_7_x.lora_up.weight"] = np.ones((4, 2), np.float32)
    save_file(tensors, str(path))
    run = _generate(tiny_pipeline, tmp_path / "image.png", "--lora", str(path))
    assert run.returncode == 0, run.stderr
    warned = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "name no layer of this model" in warned[0] and "down_blocks_7_x" in warned[0]
