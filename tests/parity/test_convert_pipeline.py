"""convert.py on whole SDXL pipelines: diffusers folders, Hub snapshots and original single files
(base and refiner) -> MLX pipeline folders whose every tensor is the reference's, exactly."""

import copy
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from original_layout import SINGLE_FILE_FAMILIES, sdxl_single_file
from reference import tiny_config, torch_unet
from reference_text import torch_text_encoder
from reference_vae import torch_vae
from safetensors.torch import save_file
from test_convert import _hub_cache
from tokenizer_files import write_clip_tokenizer
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTokenizer as TorchCLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mlx_unet import UNetConfig
from mlx_unet.configs.base import FORMAT_KEY
from mlx_unet.convert import convert, fetch_tokenizers
from mlx_unet.errors import ConversionError
from mlx_unet.safetensors_io import SafetensorsReader
from mlx_unet.schedulers import SDXL_SCHEDULER_CONFIG
from mlx_unet import CLIPTextConfig
from mlx_unet.naming.clip import checkpoint_names
from mlx_unet.tokenizer import CLIPTokenizer, bundled_tokenizer_files
from mlx_unet import VAEConfig
from mlx_unet.weights import torch_to_mlx_layout

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 300  # token rows: the tokenizer files here are stand-ins, the conversion only copies them
MODELS = ("unet", "text_encoder", "text_encoder_2", "vae")


@dataclass
class Parts:
    """A pipeline's reference models (torch, seeded) and their configs, by component name."""

    configs: dict
    models: dict
    refiner: bool


def make_parts(unet: UNetConfig, text_encoder: CLIPTextConfig | None, text_encoder_2: CLIPTextConfig,
               vae: VAEConfig, seed: int) -> Parts:
    configs = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae}
    configs = {k: v for k, v in configs.items() if v is not None}
    build = {"unet": torch_unet, "text_encoder": torch_text_encoder, "text_encoder_2": torch_text_encoder, "vae": torch_vae}
    models = {name: build[name](config, seed=seed + i) for i, (name, config) in enumerate(configs.items())}
    return Parts(configs, models, refiner=text_encoder is None)


def tiny_parts(refiner: bool, seed: int) -> Parts:
    """Widths that fit together, as the converter checks: token states 16 + 32 = the UNet's 48
    (refiner: 40), pooled 40 (32) + time ids = its added embedding."""
    unet = tiny_config("sdxl-refiner" if refiner else "sdxl-base")
    bigg = CLIPTextConfig.from_preset("tiny-clip-bigg", vocab_size=VOCAB, num_hidden_layers=2,
                                      **({} if refiner else {"hidden_size": 32, "num_attention_heads": 4, "projection_dim": 40}))
    clip_l = None if refiner else CLIPTextConfig.from_preset("tiny-clip-l", vocab_size=VOCAB, hidden_size=16,
                                                             num_attention_heads=2, num_hidden_layers=2)
    # The tiny VAE preset is safe in float16; the base's says otherwise, as SDXL's does.
    vae = VAEConfig.from_preset("tiny", force_upcast=not refiner)
    return make_parts(unet, clip_l, bigg, vae, seed)


# Single files are inferred from their tensors and SDXL's known values (64-wide heads, the VAE's
# 32 norm groups and scaling), so these keep SDXL's widths; the depths are cut.
SMALL_TEXT = {"vocab_size": VOCAB, "num_hidden_layers": 2, "intermediate_size": 64}


def model_index(parts: Parts) -> dict:
    """As the published SDXL repos have it (diffusers 0.19 wrote them)."""
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if parts.refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": not parts.refiner,
        "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if parts.refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if parts.refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if parts.refiner:
        index["requires_aesthetics_score"] = True
    return index


def write_tokenizer(folder: Path, pad: str) -> None:
    """A small hand-made tokenizer in the layout transformers 4 saved (SDXL's second tokenizer pads
    with "!"): the byte symbols CLIP's BPE starts from, one merge, the two special tokens."""
    folder.mkdir(parents=True)
    alphabet = list(bytes_to_unicode().values())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "ab</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad, "eos_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": pad}))


def write_pipeline(folder: Path, parts: Parts) -> Path:
    """A diffusers SDXL pipeline folder, each model saved by its own library."""
    for name, model in parts.models.items():
        model.save_pretrained(folder / name)
    for name in ("tokenizer", "tokenizer_2"):
        if name != "tokenizer" or not parts.refiner:
            write_tokenizer(folder / name, pad="<|endoftext|>" if name == "tokenizer" else "!")
    (folder / "scheduler").mkdir()
    scheduler = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", **SDXL_SCHEDULER_CONFIG}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (folder / "model_index.json").write_text(json.dumps(model_index(parts)))
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    parts = tiny_parts(refiner=False, seed=60)
    return parts, write_pipeline(tmp_path_factory.mktemp("base") / "pipe", parts)


@pytest.fixture(scope="module")
def refiner_parts():
    """A single-file-sized refiner; the base file shares its second text encoder and VAE."""
    return make_parts(SINGLE_FILE_FAMILIES["sdxl-refiner"], None, CLIPTextConfig.from_preset("sdxl-clip-bigg", **SMALL_TEXT),
                      VAEConfig.from_preset("sdxl", block_out_channels=[32, 32, 64, 64], layers_per_block=1), seed=70)


def write_single_file(path: Path, parts: Parts) -> Path:
    states = {name: model.state_dict() for name, model in parts.models.items()}
    save_file(sdxl_single_file(states["unet"], parts.configs["unet"], states["text_encoder_2"], states["vae"],
                               states.get("text_encoder")), str(path))
    return path


def expected_tensors(name: str, model) -> dict[str, np.ndarray]:
    """The reference's parameters under our names, in MLX layout."""
    state = {k: torch_to_mlx_layout(v.detach().float().numpy()) for k, v in model.state_dict().items()}
    return checkpoint_names(state) if name.startswith("text_encoder") else state


def assert_converted(folder: Path, name: str, model, dtype: mx.Dtype):
    """Every tensor of ``folder/name`` is the reference's in ``dtype``, and nothing else is there."""
    got = mx.load(str(folder / name / "model.safetensors"))
    expected = expected_tensors(name, model)
    assert set(got) == set(expected), name
    assert {v.dtype for v in got.values()} == {dtype}, name
    differ = [k for k, v in expected.items() if not mx.array_equal(got[k], mx.array(v).astype(dtype))]
    assert not differ, (name, differ[:5])


def assert_configs(folder: Path, parts: Parts):
    """Our config.json files parse back to the references' configs, and their libraries read them."""
    for name, config in parts.configs.items():
        parse = {"unet": UNetConfig, "vae": VAEConfig}.get(name, CLIPTextConfig).from_json
        assert parse(folder / name) == config, name
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts.configs:
            theirs = TorchCLIPTextConfig.from_pretrained(folder / name).to_dict()
            assert CLIPTextConfig.from_dict(theirs) == parts.configs[name]
    assert VAEConfig.from_dict(dict(TorchVAE.load_config(folder / "vae"))) == parts.configs["vae"]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def expected_listing(parts: Parts, weights: str = "model.safetensors") -> list[str]:
    """``weights``: each model's weights file (a linked conversion's: its table)."""
    models = [f"{n}/{f}" for n in parts.configs for f in ("config.json", weights)]
    tokenizers = [f"{t}/{f}" for t in ("tokenizer", "tokenizer_2") if t != "tokenizer" or not parts.refiner
                  for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")]
    return sorted([*models, *tokenizers, "model_index.json", "scheduler/scheduler_config.json"])


# ---------------------------------------------------------------------- diffusers folders


def test_pipeline_folder_converts_whole(tmp_path, base):
    parts, source = base
    result = convert(source, tmp_path / "mlx", progress=False)  # default float16; the VAE asks for float32
    out = tmp_path / "mlx"
    assert listing(out) == expected_listing(parts)
    for name, model in parts.models.items():
        assert_converted(out, name, model, mx.float32 if name == "vae" else mx.float16)
    assert result.dtypes == {"unet": "float16", "text_encoder": "float16", "text_encoder_2": "float16", "vae": "float32"}
    assert_configs(out, parts)
    for name in ("tokenizer", "tokenizer_2"):
        for file in (source / name).iterdir():
            assert (out / name / file.name).read_bytes() == file.read_bytes()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == \
        json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    assert json.loads((out / "model_index.json").read_text()) == {**model_index(parts), FORMAT_KEY: "1"}
    metadata = SafetensorsReader(out / "vae" / "model.safetensors").metadata
    assert metadata["dtype"] == "float32" and str(source / "vae") in metadata["source"]


def test_variants_shards_and_transformers_4_files(tmp_path):
    """Per model, the same file choice as for the UNet: the text encoders' sharded fp16 variant for
    float16, the VAE's full-precision file for its float32. A text encoder saved by transformers 4
    (``text_model.`` names and the position_ids buffer) converts to the same names."""
    parts = tiny_parts(refiner=False, seed=80)
    source = write_pipeline(tmp_path / "pipe", parts)
    half = {}
    for name in ("text_encoder", "text_encoder_2"):
        half[name] = torch_text_encoder(parts.configs[name], seed=90).half()
        half[name].save_pretrained(source / name, variant="fp16", max_shard_size="5KB")
        assert len(list((source / name).glob("model.fp16-*-of-*.safetensors"))) > 1
    torch_vae(parts.configs["vae"], seed=91).half().save_pretrained(source / "vae", variant="fp16")
    old = {"text_model.embeddings.position_ids": torch.arange(77)[None],
           **{("" if k.startswith("text_model.") else "text_model.") + k: v
              for k, v in parts.models["text_encoder"].state_dict().items()}}
    save_file(old, str(source / "text_encoder" / "model.safetensors"))

    convert(source, tmp_path / "half", progress=False)
    for name in ("text_encoder", "text_encoder_2"):
        assert_converted(tmp_path / "half", name, half[name], mx.float16)
    assert_converted(tmp_path / "half", "vae", parts.models["vae"], mx.float32)
    convert(source, tmp_path / "full", dtype="float32", vae_dtype="bfloat16", progress=False)
    assert_converted(tmp_path / "full", "text_encoder", parts.models["text_encoder"], mx.float32)
    assert_converted(tmp_path / "full", "vae", parts.models["vae"], mx.bfloat16)


def test_refiner_pipeline_folder(tmp_path):
    parts = tiny_parts(refiner=True, seed=100)
    source = write_pipeline(tmp_path / "pipe", parts)
    convert(source, tmp_path / "mlx", progress=False)
    out = tmp_path / "mlx"
    assert listing(out) == expected_listing(parts)  # no text_encoder/, no tokenizer/
    for name, model in parts.models.items():
        # The tiny VAE's config has force_upcast: false, so it takes the main dtype.
        assert_converted(out, name, model, mx.float16)
    assert_configs(out, parts)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == index["tokenizer"] == [None, None] and index["requires_aesthetics_score"] is True


def test_tokenizers_saved_by_transformers_5_are_written_as_transformers_4_did(tmp_path, base):
    """transformers 5 saves tokenizer.json alone; the converted folder holds vocab.json and
    merges.txt again, and tokenizes as transformers does (CLIP's real vocabulary here)."""
    source = tmp_path / "pipe"
    shutil.copytree(base[1], source, ignore=shutil.ignore_patterns("*.safetensors"))
    theirs = {}
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        shutil.rmtree(source / name)
        theirs[name] = TorchCLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / f"{name}-4", pad_token=pad))
        theirs[name].save_pretrained(source / name)
        assert sorted(p.name for p in (source / name).iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for name in MODELS:
        for file in (base[1] / name).glob("*.safetensors"):
            (source / name / file.name).symlink_to(file)
    convert(source, tmp_path / "mlx", progress=False)
    # Upper-case special tokens match only those marked "normalized" (lower-cased before matching).
    prompts = ["A photo of a cat, rainbow!!", "<|startoftext|>two  spaces<|endoftext|> and ! more", "",
               "<|STARTOFTEXT|> or <|ENDOFTEXT|>"]
    for name, tokenizer in theirs.items():
        written = sorted(p.name for p in (tmp_path / "mlx" / name).iterdir())
        assert written == ["merges.txt", "tokenizer_config.json", "vocab.json"]
        expected = tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
        assert CLIPTokenizer.from_folder(tmp_path / "mlx" / name)(prompts).tolist() == expected, name


# ---------------------------------------------------------------------- the Hub


def test_hub_download_fetches_configs_then_one_variant_per_model(tmp_path, base, monkeypatch):
    """The online path with huggingface_hub's two calls stood in for (no network here)."""
    parts, source = base
    snapshot = tmp_path / "snapshot"
    shutil.copytree(source, snapshot)
    copy.deepcopy(parts.models["unet"]).half().save_pretrained(snapshot / "unet", variant="fp16")
    files = {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()}
    extras = {"unet/diffusion_pytorch_model.bin", "text_encoder/model.onnx", "text_encoder/pytorch_model.bin",
              "vae/diffusion_pytorch_model.fp16.safetensors", "vae_decoder/model.onnx", "README.md"}
    requests = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: sorted(files | extras))

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        requests.append((repo_id, revision, sorted(allow_patterns)))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    result = convert("org/sdxl-tiny", tmp_path / "mlx", revision="v1", progress=False)
    tokenizers = [f"{t}/{f}" for t in ("tokenizer", "tokenizer_2")
                  for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")]
    configs = [f"{n}/config.json" for n in MODELS]
    assert requests == [
        ("org/sdxl-tiny", "v1", sorted([*configs, *tokenizers, "model_index.json", "scheduler/scheduler_config.json"])),
        ("org/sdxl-tiny", "v1", ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                                 "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors"]),
    ]
    assert result.notes == [] and listing(tmp_path / "mlx") == expected_listing(parts)
    for name, model in parts.models.items():
        assert_converted(tmp_path / "mlx", name, model, mx.float32 if name == "vae" else mx.float16)


def test_hub_repo_from_the_offline_cache(tmp_path, base, monkeypatch):
    parts, source = base
    files = {str(p.relative_to(source)): p for p in source.rglob("*") if p.is_file()}
    cache = _hub_cache(tmp_path / "hub", "someone/tiny-sdxl", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    convert("someone/tiny-sdxl", tmp_path / "mlx", dtype="float32", progress=False)
    for name, model in parts.models.items():
        assert_converted(tmp_path / "mlx", name, model, mx.float32)

    del files["vae/diffusion_pytorch_model.safetensors"]
    _hub_cache(tmp_path / "hub2", "someone/partial", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub2"))
    with pytest.raises(ConversionError, match="cached snapshot of someone/partial is incomplete: no VAE weights"):
        convert("someone/partial", tmp_path / "mlx2", progress=False)
    assert not (tmp_path / "mlx2").exists()


def test_tokenizers_from_a_hub_repo_fetch_only_tokenizer_files(tmp_path, base, monkeypatch):
    snapshot = base[1]
    requests = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: [
        "model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json", "tokenizer/tokenizer.json",
        "unet/diffusion_pytorch_model.safetensors"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, allow_patterns=None: requests.append(sorted(allow_patterns)) or str(snapshot))
    assert fetch_tokenizers("org/sdxl") == snapshot
    assert requests == [["tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer_2/merges.txt",
                         "tokenizer_2/special_tokens_map.json", "tokenizer_2/vocab.json"]]
    assert fetch_tokenizers(str(snapshot)) == snapshot  # a local folder is used where it is
    with pytest.raises(ConversionError, match="--tokenizers ./nowhere does not exist; pass a diffusers pipeline folder or a Hub repo id"):
        fetch_tokenizers("./nowhere")


# ---------------------------------------------------------------------- original single files


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_single_file_converts_whole(tmp_path, base, refiner_parts, kind):
    refiner = kind == "refiner"
    parts = refiner_parts
    if not refiner:
        unet, clip_l = SINGLE_FILE_FAMILIES["sdxl-base"], CLIPTextConfig.from_preset("sdxl-clip-l", **SMALL_TEXT)
        parts = Parts({**parts.configs, "unet": unet, "text_encoder": clip_l},
                      {**parts.models, "unet": torch_unet(unet, seed=110), "text_encoder": torch_text_encoder(clip_l, seed=111)},
                      refiner=False)
    path = write_single_file(tmp_path / f"sd_xl_{kind}.safetensors", parts)

    result = convert(path, tmp_path / "mlx", dtype="float32", tokenizers=base[1], progress=False)
    out = tmp_path / "mlx"
    assert listing(out) == expected_listing(parts)
    for name, model in parts.models.items():
        assert_converted(out, name, model, mx.float32)
    assert_configs(out, parts)  # inferred from the tensors and SDXL's known values
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == {"_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULER_CONFIG}
    index = json.loads((out / "model_index.json").read_text())
    expected_index = {k: v for k, v in model_index(parts).items() if k not in ("_diffusers_version", "add_watermarker")}
    assert index == {**expected_index, FORMAT_KEY: "1"}
    left = ["conditioner.embedders.0.model.logit_scale"] if refiner else \
        ["conditioner.embedders.0.transformer.text_model.embeddings.position_ids", "conditioner.embedders.1.model.logit_scale"]
    assert f"left alone: {len(left)} tensors ({', '.join(left)})" in result.notes


def test_single_file_without_tokenizers_uses_the_bundled_vocabulary(tmp_path, refiner_parts):
    """No --tokenizers: CLIP's vocabulary that ships with mlx-unet, padded as SDXL's second
    tokenizer is ("!"); the same single file still converts its UNet alone with --unet-only."""
    refiner_file = write_single_file(tmp_path / "sd_xl_refiner.safetensors", refiner_parts)
    proc = subprocess.run([sys.executable, str(ROOT / "convert.py"), str(refiner_file), str(tmp_path / "out"),
                           "--dtype", "float32"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "tokenizers: CLIP's vocabulary, shipped with mlx-unet (tokenizer_2 pads with '!')" in proc.stderr
    assert listing(tmp_path / "out") == expected_listing(refiner_parts)
    written = {f.name: f.read_bytes() for f in (tmp_path / "out" / "tokenizer_2").iterdir()}
    assert written == bundled_tokenizer_files("!")

    convert(refiner_file, tmp_path / "unet", dtype="float32", unet_only=True, progress=False)
    assert listing(tmp_path / "unet") == ["config.json", "model.safetensors"]  # the layout from before pipelines
    assert UNetConfig.from_json(tmp_path / "unet") == refiner_parts.configs["unet"]
    assert_converted(tmp_path, "unet", refiner_parts.models["unet"], mx.float32)
