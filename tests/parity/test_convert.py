"""convert.py: diffusers folders, Hub snapshots, original single files and pickles -> MLX folders
that load and match diffusers (bad input: test_convert_refusals.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from in_process import run_main
from original_layout import SINGLE_FILE_FAMILIES, to_original_layout
from reference import TIME_IDS, TINY_FAMILIES, make_inputs, relative_error, run_mlx, run_torch, tiny_config, torch_unet
from safetensors.torch import save_file

from mlx_unet import UNet2DConditionModel
from mlx_unet.cli.convert import main as convert_main
from mlx_unet.convert import convert
from mlx_unet.errors import ConversionError
from mlx_unet.naming.ldm_unet import ema_name
from mlx_unet.safetensors_io import SafetensorsReader

ROOT = Path(__file__).resolve().parents[2]
FP32 = 1e-4


def run_cli(*args, env=None):
    """convert.py as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), *map(str, args)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT,
    )


def run_in_process(*args):
    """convert.py's ``main`` in this process (``in_process.run_main``): for the refusals, each kind
    of which also runs as a process."""
    return run_main(convert_main, *map(str, args), name="convert.py")


def assert_matches(out_dir, reference, config, family="", seed=0):
    ours = UNet2DConditionModel.from_pretrained(out_dir, dtype=mx.float32)
    inputs = make_inputs(config, 2, 16, 16, seed=seed, timesteps=[20.0, 700.0], n_time_ids=TIME_IDS.get(family))
    assert relative_error(run_mlx(ours, inputs), run_torch(reference, inputs)) <= FP32


def rounded_to_fp16(model):
    """The model with float16-representable weights, kept in float32 (the reference for fp16 files)."""
    return model.half().float()


def save_fp16_variant(model, folder):
    """diffusers' fp16 variant, as Hub repos ship it; ``model`` stays float32."""
    model.half().save_pretrained(folder, variant="fp16")
    model.float()


# ---------------------------------------------------------------------- diffusers folders


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def family(request):
    config = tiny_config(request.param)
    return request.param, config, torch_unet(config, seed=30)


# The file forms do not depend on the family: every family plain, the other forms in the slow tier.
@pytest.mark.parametrize("form", ["plain", pytest.param("fp16-variant", marks=pytest.mark.slow),
                                  pytest.param("sharded", marks=pytest.mark.slow)])
def test_diffusers_folder_converts_and_matches(tmp_path, family, form):
    name, config, reference = family
    folder = tmp_path / "unet"
    if form == "fp16-variant":
        reference = rounded_to_fp16(torch_unet(config, seed=30))
        save_fp16_variant(reference, folder)
    else:
        reference.save_pretrained(folder, max_shard_size="200KB" if form == "sharded" else "10GB")
    if form == "sharded":
        assert len(list(folder.glob("*.safetensors"))) > 3
    result = convert(folder, tmp_path / "mlx", dtype="float32", progress=False)
    assert result.config == config
    assert result.notes == ["the source holds only a UNet: writing it alone (config.json + model.safetensors)"]
    assert_matches(tmp_path / "mlx", reference, config, name)


def test_pipeline_root_uses_its_unet_folder_and_default_float16(tmp_path):
    config = tiny_config("sdxl-base")
    reference = rounded_to_fp16(torch_unet(config, seed=31))
    reference.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    proc = run_cli(tmp_path / "pipe", tmp_path / "mlx", "--unet-only")
    assert proc.returncode == 0, proc.stderr
    assert "converting: 100%" in proc.stderr  # progress is shown
    reader = SafetensorsReader(tmp_path / "mlx" / "model.safetensors")
    assert {i.dtype for i in reader.tensors.values()} == {"F16"}
    assert reader.metadata["dtype"] == "float16" and reader.metadata["mlx_unet_format_version"] == "1"
    assert str(tmp_path / "pipe" / "unet") in reader.metadata["source"]
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["cross_attention_dim"] == config.cross_attention_dim
    assert_matches(tmp_path / "mlx", reference, config)


def _two_variants(tmp_path):
    """A folder whose fp32 and fp16 files hold different models, to see which one was read."""
    config = tiny_config("sd15")
    full, half = torch_unet(config, seed=32), rounded_to_fp16(torch_unet(config, seed=33))
    full.save_pretrained(tmp_path / "unet")
    save_fp16_variant(half, tmp_path / "unet")
    return config, full, half


def test_variant_choice(tmp_path):
    config, full, half = _two_variants(tmp_path)
    convert(tmp_path / "unet", tmp_path / "a", dtype="float16", progress=False)  # prefers the fp16 file
    convert(tmp_path / "unet", tmp_path / "b", dtype="float32", progress=False)  # prefers full precision
    convert(tmp_path / "unet", tmp_path / "c", dtype="float32", variant="fp16", progress=False)
    assert_matches(tmp_path / "a", half, config)
    assert_matches(tmp_path / "b", full, config)
    assert_matches(tmp_path / "c", half, config)
    with pytest.raises(ConversionError, match="expected diffusion_pytorch_model.bf16.safetensors"):
        convert(tmp_path / "unet", tmp_path / "d", variant="bf16", progress=False)


def test_tensors_are_converted_inside_a_reused_heap(tmp_path, monkeypatch):
    """Each tensor's buffers are freed before the next one's are made: inside ``cpu.heap``'s
    reused heap the next tensor's come from them, where large ones were fresh memory every time."""
    from mlx_unet.convert import writer
    from mlx_unet.cpu import heap

    depths, write = [], writer.write_safetensors
    monkeypatch.setattr(writer, "write_safetensors", lambda *a, **k: depths.append(heap._depth) or write(*a, **k))
    config = tiny_config("sd15")
    reference = torch_unet(config, seed=34)
    reference.save_pretrained(tmp_path / "unet")
    convert(tmp_path / "unet", tmp_path / "mlx", dtype="float32", progress=False)
    assert depths == [1 if heap.available() else 0] and heap._depth == 0
    assert_matches(tmp_path / "mlx", reference, config)


# ---------------------------------------------------------------------- the Hub


def _hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A huggingface_hub cache holding ``repo`` at revision main (blobs linked from a snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for i, (name, source) in enumerate(files.items()):
        blob = repo_dir / "blobs" / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(source.read_bytes())
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


def test_hub_repo_from_the_offline_cache(tmp_path):
    config = tiny_config("sdxl-base")
    reference = rounded_to_fp16(torch_unet(config, seed=34))
    save_fp16_variant(reference, tmp_path / "saved")
    cache = _hub_cache(tmp_path / "hub", "someone/tiny-sdxl", {
        "model_index.json": tmp_path / "saved" / "config.json",
        "unet/config.json": tmp_path / "saved" / "config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors": tmp_path / "saved" / "diffusion_pytorch_model.fp16.safetensors",
    })
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    proc = run_cli("someone/tiny-sdxl", tmp_path / "mlx", "--dtype", "float32", "--unet-only", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Hub repo someone/tiny-sdxl" in proc.stderr
    assert_matches(tmp_path / "mlx", reference, config)

    missing = run_cli("someone/other", tmp_path / "mlx2", env=env)
    assert missing.returncode == 2 and "is not in the Hugging Face cache" in missing.stderr
    assert not (tmp_path / "mlx2").exists()


def test_hub_offline_cache_without_weights_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("sd15").to_diffusers_dict()))
    cache = _hub_cache(tmp_path / "hub", "someone/partial", {"unet/config.json": tmp_path / "config.json"})
    proc = run_cli("someone/partial", tmp_path / "mlx", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 2
    assert "cached snapshot of someone/partial is incomplete" in proc.stderr
    assert "diffusion_pytorch_model.safetensors" in proc.stderr


def test_hub_download_fetches_only_the_unet_preferring_fp16(tmp_path, monkeypatch):
    """The online path with huggingface_hub's two calls stood in for (no network here)."""
    import huggingface_hub

    config = tiny_config("sd15")
    reference = rounded_to_fp16(torch_unet(config, seed=35))
    snapshot = tmp_path / "snapshot"
    save_fp16_variant(reference, snapshot / "unet")
    listing = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
               "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
               "text_encoder/model.safetensors"]
    requested = {}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: listing)

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        requested.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert("org/sd15-tiny", tmp_path / "mlx", revision="v1", unet_only=True, progress=False)
    assert requested == {"repo_id": "org/sd15-tiny", "revision": "v1",
                         "allow_patterns": ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]}
    assert_matches(tmp_path / "mlx", reference, config)


# ---------------------------------------------------------------------- original single files


def _other_components():
    """Stand-ins for what a full checkpoint carries besides the UNet (left alone by convert)."""
    return {
        "first_stage_model.decoder.conv_in.weight": torch.ones(4, 4, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.ones(8, 4),
        "alphas_cumprod": torch.linspace(0, 1, 10),
    }


def write_single_file(path, model, config, ema_model=None):
    tensors = to_original_layout(model.state_dict(), config)
    if ema_model is not None:
        ema = to_original_layout(ema_model.state_dict(), config)
        tensors.update({ema_name(k): v for k, v in ema.items()})
        tensors["model_ema.decay"] = torch.tensor(0.9999)
    save_file({**tensors, **_other_components()}, str(path))
    return path


# SDXL base and SD 1.x in the fast tier; the other families are the same inference.
@pytest.mark.parametrize("name", [n if n in ("sdxl-base", "sd15") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in SINGLE_FILE_FAMILIES])
def test_single_file_with_inferred_config(tmp_path, name):
    config = SINGLE_FILE_FAMILIES[name]
    reference = torch_unet(config, seed=36)
    path = write_single_file(tmp_path / "model.safetensors", reference, config)
    run = run_cli if name == "sdxl-base" else run_in_process
    proc = run(path, tmp_path / "mlx", "--dtype", "float32", "--unet-only")
    assert proc.returncode == 0, proc.stderr
    assert "left alone: VAE (1 tensors), text encoders (1 tensors), other (1 tensors)" in proc.stderr
    inferred = UNet2DConditionModel.from_pretrained(tmp_path / "mlx").config
    assert inferred == config
    assert_matches(tmp_path / "mlx", reference, config, name)


def test_single_file_ema_weights(tmp_path):
    config = SINGLE_FILE_FAMILIES["sd15"]
    live, ema = torch_unet(config, seed=37), torch_unet(config, seed=38)
    path = write_single_file(tmp_path / "v1.safetensors", live, config, ema_model=ema)
    convert(path, tmp_path / "ema", dtype="float32", ema=True, unet_only=True, progress=False)
    convert(path, tmp_path / "live", dtype="float32", unet_only=True, progress=False)
    assert_matches(tmp_path / "ema", ema, config)
    assert_matches(tmp_path / "live", live, config)
    no_ema = write_single_file(tmp_path / "plain.safetensors", live, config)
    result = convert(no_ema, tmp_path / "fallback", dtype="float32", ema=True, unet_only=True, progress=False)
    assert any("has no EMA weights" in note for note in result.notes)


def test_lone_diffusers_weights_file_uses_the_config_beside_it(tmp_path):
    config = tiny_config("sd2")
    reference = torch_unet(config, seed=39)
    reference.save_pretrained(tmp_path / "unet")
    convert(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "mlx", dtype="float32", progress=False)
    assert_matches(tmp_path / "mlx", reference, config)


def test_explicit_config_overrides_inference(tmp_path):
    config = SINGLE_FILE_FAMILIES["sd2"].to_diffusers_dict()
    config["upcast_attention"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = torch_unet(SINGLE_FILE_FAMILIES["sd2"], seed=40)
    path = write_single_file(tmp_path / "sd2.safetensors", reference, SINGLE_FILE_FAMILIES["sd2"])
    result = convert(path, tmp_path / "mlx", config=tmp_path / "config.json", unet_only=True, progress=False)
    assert result.config.upcast_attention is False


# ---------------------------------------------------------------------- pickles


def test_pickles_are_refused_unless_allowed(tmp_path):
    config = SINGLE_FILE_FAMILIES["sd15"]
    reference = torch_unet(config, seed=41)
    ckpt = tmp_path / "v1.ckpt"
    torch.save({"state_dict": to_original_layout(reference.state_dict(), config), "global_step": 10}, ckpt)
    refused = run_cli(ckpt, tmp_path / "mlx")
    assert refused.returncode == 2 and "is a PyTorch pickle" in refused.stderr and "--allow-pickle" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "mlx").exists()
    accepted = run_cli(ckpt, tmp_path / "mlx", "--allow-pickle", "--dtype", "float32")
    assert accepted.returncode == 0, accepted.stderr
    assert_matches(tmp_path / "mlx", reference, config)


def test_diffusers_bin_folder_needs_allow_pickle(tmp_path):
    config = tiny_config("sd15")
    reference = torch_unet(config, seed=42)
    reference.save_pretrained(tmp_path / "unet", safe_serialization=False)
    with pytest.raises(ConversionError, match="is a PyTorch pickle"):
        convert(tmp_path / "unet", tmp_path / "mlx", progress=False)
    convert(tmp_path / "unet", tmp_path / "mlx", dtype="float32", allow_pickle=True, progress=False)
    assert_matches(tmp_path / "mlx", reference, config)
