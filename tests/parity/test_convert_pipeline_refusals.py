"""convert.py refusing bad whole pipelines: an output that overlaps a source or the Hub cache, a
damaged or mismatched pipeline, and a failure midway, each before or without touching anything."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import huggingface_hub
import pytest
from reference_text import torch_text_encoder
from test_convert_pipeline import ROOT, tiny_parts, write_pipeline

from mlx_unet import WeightsError
from mlx_unet.convert import convert
from mlx_unet.errors import ConversionError
from mlx_unet.safetensors_io import SafetensorsReader


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SDXL pipeline folder: (its parts, its folder)."""
    parts = tiny_parts(refiner=False, seed=60)
    return parts, write_pipeline(tmp_path_factory.mktemp("base") / "pipe", parts)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("out", ["src", "src/vae", "src/new", "parent", "tok", "tok/tokenizer", "tok_parent"])
def test_output_overlapping_a_source_is_refused_before_anything_is_touched(tmp_path, base, out):
    """convert.py SRC SRC/vae --force used to delete the source's VAE (and --tokenizers D ... D
    --force the tokenizers): an OUT_DIR equal to, inside or around either source is refused."""
    root = tmp_path / "parent"
    src = shutil.copytree(base[1], root / "src")
    tok = shutil.copytree(base[1], root / "tokdir" / "tok", ignore=shutil.ignore_patterns("unet", "vae", "text_encoder*"))
    where = {"src": src, "src/vae": src / "vae", "src/new": src / "new", "parent": root,
             "tok": tok, "tok/tokenizer": tok / "tokenizer", "tok_parent": tok.parent}[out]
    before = _tree(root)
    proc = subprocess.run([sys.executable, str(ROOT / "convert.py"), str(src), str(where), "--force",
                           "--tokenizers", str(tok), "--dtype", "float32"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: OUT_DIR {where} ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "choose a folder outside it" in proc.stderr
    assert _tree(root) == before  # not a byte changed, nothing added


def test_output_overlapping_the_hub_cache_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for fetch in ("list_repo_files", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, fetch, lambda *a, **k: pytest.fail("nothing may be fetched"))
    for out in (cache, cache / "models--a--b", tmp_path):
        with pytest.raises(ConversionError, match="Hugging Face cache"):
            convert("owner/model", out, force=True, progress=False)
    assert list(cache.iterdir()) == []


def _damage(source: Path, damage: str) -> None:
    if damage == "truncated":
        weights = source / "text_encoder_2" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "vae-config":
        config = json.loads((source / "vae" / "config.json").read_text())
        (source / "vae" / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    elif damage == "no-vocab":
        (source / "tokenizer_2" / "vocab.json").unlink()
    elif damage == "bad-vocab":
        (source / "tokenizer_2" / "vocab.json").write_text(json.dumps({"!": 0}))
    elif damage in ("not-run", "sd-index"):
        index = json.loads((source / "model_index.json").read_text())
        kind = "StableDiffusionUpscalePipeline" if damage == "not-run" else "StableDiffusionPipeline"
        (source / "model_index.json").write_text(json.dumps({**index, "_class_name": kind}))
    elif damage == "wrong-encoder":
        shutil.rmtree(source / "text_encoder_2")
        shutil.copytree(source / "text_encoder", source / "text_encoder_2")
    elif damage == "no-scheduler":
        shutil.rmtree(source / "scheduler")


@pytest.mark.parametrize("damage,error,message", [
    ("truncated", WeightsError, "model.safetensors is truncated: tensor"),
    ("vae-config", WeightsError, "vae (diffusion_pytorch_model.safetensors): the weights do not match"),
    ("no-vocab", ConversionError, "tokenizer_2 holds no tokenizer (vocab.json and merges.txt, or tokenizer.json); "
                                  "download it again, or pass --tokenizers"),
    ("bad-vocab", ConversionError, "tokenizer_2 does not load: "),
    ("not-run", ConversionError, "is a StableDiffusionUpscalePipeline pipeline, which mlx-unet does not run (it converts "
                                 "SD 1.x, 2.x and SDXL text-to-image, img2img and inpainting pipelines whole): pass "
                                 "--unet-only to convert its UNet."),
    # An SD pipeline's index on SDXL's models: only the first text encoder is taken, and does not fit the UNet.
    ("sd-index", ConversionError, "the text encoders give 16-wide token states but the UNet's cross-attention takes "
                                  "48; these models do not belong together."),
    ("wrong-encoder", ConversionError, "text_encoder_2/config.json describes a CLIPTextModel; the second text encoder "
                                       "of a StableDiffusionXLPipeline is a CLIPTextModelWithProjection."),
    ("no-scheduler", ConversionError, "no scheduler config at"),
])
def test_bad_pipelines_are_refused_and_nothing_is_written(tmp_path, base, damage, error, message):
    source = tmp_path / "pipe"
    shutil.copytree(base[1], source)
    _damage(source, damage)
    with pytest.raises(error) as raised:
        convert(source, tmp_path / "out", progress=False)
    assert message in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_models_that_do_not_belong_together(tmp_path, base):
    source = tmp_path / "pipe"
    shutil.copytree(base[1], source)
    other = replace(base[0].configs["text_encoder"], hidden_size=24, num_attention_heads=2)
    shutil.rmtree(source / "text_encoder")
    torch_text_encoder(other, seed=1).save_pretrained(source / "text_encoder")
    with pytest.raises(ConversionError, match=r"the text encoders give 24 \+ 32-wide token states but the UNet's "
                                              r"cross-attention takes 48; these models do not belong together"):
        convert(source, tmp_path / "out", progress=False)


def test_failure_midway_leaves_nothing_and_keeps_the_old_output(tmp_path, base, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous conversion")
    real_read = SafetensorsReader.read

    def failing_read(self, name):
        if name.startswith("decoder."):  # the VAE, written after the UNet and text encoders
            raise OSError("disk full")
        return real_read(self, name)

    monkeypatch.setattr(SafetensorsReader, "read", failing_read)
    with pytest.raises(OSError, match="disk full"):
        convert(base[1], out, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
