"""convert.py refusing bad input cleanly (exit code 2, one line, nothing written), and writing its
output atomically: a failure midway leaves the old output as it was."""

import json
import sys
from pathlib import Path

import pytest
import torch
from original_layout import SINGLE_FILE_FAMILIES, to_original_layout
from reference import tiny_config, torch_unet
from safetensors.torch import save_file
from test_convert import ROOT, assert_matches, run_cli, run_in_process, write_single_file

from mlx_unet.convert import convert
from mlx_unet.errors import ConversionError
from mlx_unet.safetensors_io import SafetensorsReader


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    config = SINGLE_FILE_FAMILIES["sd15"]
    path = tmp_path_factory.mktemp("src") / "sd15.safetensors"
    return write_single_file(path, torch_unet(config, seed=43), config)


def test_checkpoint_without_its_text_encoder_needs_unet_only(tmp_path, sd15_file):
    """An SD 1.x UNet beside parts of other layouts (an sgm text encoder): not a whole SD 1.x file."""
    with pytest.raises(ConversionError, match=r"sd15.safetensors holds no text encoder \(cond_stage_model\.\*\), so "
                                              "it is not a whole SD 1.x checkpoint; pass --unet-only to convert its UNet."):
        convert(sd15_file, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _bad_files(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    data = good.read_bytes()
    files = {}

    def put(name, content, message):
        path = tmp / name
        path.write_bytes(content) if isinstance(content, bytes) else save_file(content, str(path))
        files[name] = (path, message)

    put("text.safetensors", b"this is not a checkpoint at all, just text", "is not a safetensors file")
    put("truncated.safetensors", data[: len(data) // 2], "is truncated: tensor")
    put("header.safetensors", data[:8] + b"{" + b"\x00" * (int.from_bytes(data[:8], "little") - 1) + data[8 + int.from_bytes(data[:8], "little"):],
        "corrupt safetensors header")
    put("vae.safetensors", {"first_stage_model.encoder.down.0.block.0.conv1.weight": torch.ones(2, 2, 3, 3),
                            "first_stage_model.quant_conv.weight": torch.ones(8, 8, 1, 1)}, "holds a VAE, not a UNet")
    put("clip.safetensors", {"text_model.encoder.layers.0.mlp.fc1.weight": torch.ones(4, 4)}, "holds a text encoder, not a UNet")
    put("unknown.safetensors", {"model.diffusion_model.blocks.0.weight": torch.ones(2)}, "do not fit the original SD/SDXL layout")
    return files


@pytest.mark.parametrize("case", ["text", "truncated", "header", "vae", "clip", "unknown"])
def test_bad_files_exit_2_with_one_clear_line(tmp_path, sd15_file, case):
    path, message = _bad_files(tmp_path, sd15_file)[f"{case}.safetensors"]
    proc = (run_cli if case == "text" else run_in_process)(path, tmp_path / "out")
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_cross_attention_width_asks_for_a_config(tmp_path):
    config = tiny_config("sd15")  # cross-attention width 24: no known family
    reference = torch_unet(config, seed=44)
    path = tmp_path / "odd.safetensors"
    save_file(to_original_layout(reference.state_dict(), config), str(path))
    proc = run_in_process(path, tmp_path / "out")
    assert proc.returncode == 2 and "cross-attention width 24 matches no SD family" in proc.stderr
    assert "--config" in proc.stderr


def test_unknown_cross_attention_width_converts_with_a_config(tmp_path):
    config = tiny_config("sd15")
    reference = torch_unet(config, seed=44)
    path = tmp_path / "odd.safetensors"
    save_file(to_original_layout(reference.state_dict(), config), str(path))
    (tmp_path / "config.json").write_text(json.dumps(config.to_diffusers_dict()))
    result = convert(path, tmp_path / "out", dtype="float32", config=tmp_path / "config.json", unet_only=True,
                     progress=False)
    assert "using the given config (the file's own cannot be inferred)" in result.notes
    assert_matches(tmp_path / "out", reference, config)


@pytest.mark.parametrize("damage,message", [
    ("drop", "1 missing (down_blocks.0.attentions.0.proj_in.bias)"),
    ("extra", "1 unexpected (not_a_unet_tensor)"),
    ("reshape", "1 with the wrong shape (conv_in.bias; conv_in.bias is (7,), expected (32,))"),
])
def test_missing_unexpected_and_misshaped_tensors(tmp_path, damage, message):
    config = tiny_config("sd15")
    state = dict(torch_unet(config, seed=45).state_dict())
    if damage == "drop":
        del state["down_blocks.0.attentions.0.proj_in.bias"]
    elif damage == "extra":
        state["not_a_unet_tensor"] = torch.ones(3)
    else:
        state["conv_in.bias"] = torch.ones(7)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config.to_diffusers_dict()))
    save_file(state, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    proc = (run_cli if damage == "drop" else run_in_process)(tmp_path / "unet", tmp_path / "out")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_nan_and_inf_weights_are_named_in_a_warning(tmp_path):
    config = tiny_config("sd15")
    state = dict(torch_unet(config, seed=46).state_dict())
    state["conv_in.bias"][3] = float("nan")
    state["conv_out.weight"][0, 0, 0, 0] = float("inf")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config.to_diffusers_dict()))
    save_file(state, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    proc = run_cli(tmp_path / "unet", tmp_path / "out")
    assert proc.returncode == 0
    assert "warning: 2 tensors hold NaN or inf values after conversion to float16 (conv_in.bias, conv_out.weight)" in proc.stderr


def test_other_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    for source, message in [
        (tmp_path / "empty", "is not a diffusers model: expected unet/config.json"),
        (tmp_path / "nothing-here", "nothing-here does not exist; check the path"),
    ]:
        proc = run_in_process(source, tmp_path / "out")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "in_channels": 3}))
    proc = run_in_process(vae, tmp_path / "out")
    assert proc.returncode == 2 and "describes a AutoencoderKL, not a UNet2DConditionModel" in proc.stderr
    assert run_cli("--help").returncode == 0


# ---------------------------------------------------------------------- atomic output


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path, sd15_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_in_process(sd15_file, out, "--unet-only")
    assert proc.returncode == 2 and "exists and is not empty; pass --force" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    proc = run_cli(sd15_file, out, "--force", "--unet-only")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing_and_keeps_the_old_output(tmp_path, sd15_file, monkeypatch, failure):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous conversion")
    calls = {"n": 0}
    real_read = SafetensorsReader.read

    def failing_read(self, name):
        calls["n"] += 1
        if calls["n"] == 50:
            raise failure
        return real_read(self, name)

    monkeypatch.setattr(SafetensorsReader, "read", failing_read)
    with pytest.raises(type(failure)):
        convert(sd15_file, out, force=True, unet_only=True, progress=False)
    assert calls["n"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    fresh = tmp_path / "fresh"
    calls["n"] = 0
    with pytest.raises(type(failure)):
        convert(sd15_file, fresh, unet_only=True, progress=False)
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_inside_the_source_is_refused(tmp_path):
    config = tiny_config("sd15")
    torch_unet(config, seed=47).save_pretrained(tmp_path / "unet")
    with pytest.raises(ConversionError, match="OUT_DIR .* is the source"):
        convert(tmp_path / "unet", tmp_path / "unet", force=True, progress=False)
    assert (tmp_path / "unet" / "config.json").exists()


def test_importable_as_a_function():
    sys.path.insert(0, str(ROOT))
    try:
        import convert as convert_script
    finally:
        sys.path.remove(str(ROOT))
    assert convert_script.convert is convert
