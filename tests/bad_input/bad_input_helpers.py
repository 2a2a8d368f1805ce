"""Files and checks the bad-input tests share: a tiny pipeline built in MLX alone (random models
saved as ``mlx-unet convert`` writes them), random diffusers and original-layout UNets, and the
assertions every refusal must pass. (A module of its own name: ``conftest`` is ambiguous when the
test tiers run together.)"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from in_process import run_main
from safetensors.numpy import save_file

from mlx_unet import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig, cli
from mlx_unet.convert.published import SDXL_BASE
from mlx_unet.naming.ldm_unet import UNetNames
from mlx_unet.tokenizer import _BYTE_CHARS, END_OF_WORD

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # pixels: an 8x8 latent
PROMPT = "a lighthouse at dusk"
RUN = ["--steps", "2", "--height", str(SIZE), "--width", str(SIZE), "--seed", "3", "--quiet"]


def save_model(folder: Path, model, config: dict) -> None:
    """A model folder as `mlx-unet convert` writes one: model.safetensors and config.json."""
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


# (UNet, VAE, text encoder presets) per pipeline size; the tiny UNet's widths follow the encoders'.
PIPELINE_PRESETS = {"tiny": ("tiny", "tiny", ("tiny-clip-l", "tiny-clip-bigg")),
                    "sdxl": ("sdxl-base", "sdxl", ("sdxl-clip-l", "sdxl-clip-bigg"))}


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """A CLIP tokenizer folder with the byte alphabet alone (no merges): every prompt tokenizes,
    one id per byte."""
    folder.mkdir(parents=True)
    symbols = [c + end for c in _BYTE_CHARS for end in ("", END_OF_WORD)]
    vocab = {s: i for i, s in enumerate(symbols)} | {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))


def write_pipeline(folder: Path, seed: int = 0, size: str = "tiny", dtype: mx.Dtype = mx.float32,
                   redraw: Callable[[nn.Module], object] | None = None) -> Path:
    """A random SDXL base pipeline folder as ``mlx-unet convert`` writes one: ``size`` "tiny" or
    "sdxl" (full size); the UNet and text encoders saved in ``dtype`` (the VAE in float32);
    ``redraw(model)`` replaces each model's initial weights first (e.g. trained-like draws)."""
    mx.random.seed(seed)
    unet_preset, vae_preset, encoder_presets = PIPELINE_PRESETS[size]
    encoders = dict(zip(("text_encoder", "text_encoder_2"), map(CLIPTextConfig.from_preset, encoder_presets)))
    if size == "tiny":
        width = sum(c.hidden_size for c in encoders.values())
        pooled = encoders["text_encoder_2"].projection_dim
        unet = UNetConfig.from_preset("tiny", cross_attention_dim=width,
                                      projection_class_embeddings_input_dim=pooled + 6 * 8)
    else:
        unet = UNetConfig.from_preset(unet_preset)
    vae = VAEConfig.from_preset(vae_preset)
    models = {"unet": (UNet2DConditionModel(unet), unet, dtype), "vae": (AutoencoderKL(vae), vae, mx.float32)}
    models |= {name: (CLIPTextModel(config), config, dtype) for name, config in encoders.items()}
    for name in list(models):  # one model held at a time (a full-size UNet is 4.8 GB in float16)
        model, config, model_dtype = models.pop(name)
        model.set_dtype(model_dtype)
        if redraw is not None:
            redraw(model)
        save_model(folder / name, model, config.to_dict())
        del model
    for tokenizer, pad in SDXL_BASE.pads.items():
        write_tokenizer(folder / tokenizer, pad)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_BASE.scheduler))
    index = SDXL_BASE.model_index(["text_encoder", "text_encoder_2"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def unet_tensors(config: UNetConfig, seed: int = 0, nan: bool = False) -> dict[str, np.ndarray]:
    """A random UNet's parameters in diffusers' names and PyTorch's layout (convolutions OIHW);
    ``nan``: one of them NaN, as a corrupt download has it."""
    mx.random.seed(seed)
    tensors = {k: np.array(v) for k, v in tree_flatten(UNet2DConditionModel(config).parameters())}
    tensors = {k: np.ascontiguousarray(v.transpose(0, 3, 1, 2)) if v.ndim == 4 else v for k, v in tensors.items()}
    if nan:
        tensors["conv_in.bias"][0] = np.nan
    return tensors


def write_diffusers_unet(folder: Path, config: UNetConfig, nan: bool = False) -> Path:
    """A diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors) of random weights."""
    folder.mkdir(parents=True)
    save_file(unet_tensors(config, nan=nan), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.library_dict()))
    return folder


def write_single_file(path: Path, config: UNetConfig, nan: bool = False) -> Path:
    """An original-layout UNet checkpoint (``model.diffusion_model.*``) of random weights."""
    names = UNetNames(config)
    save_file({names.take(k).key: v for k, v in unet_tensors(config, nan=nan).items()}, str(path))
    return path


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) -> the hash of its bytes: to show nothing changed."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m mlx_unet ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "mlx_unet", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """``mlx_unet.cli.main(ARGS)`` in this process, its exit code and output as ``run_cli`` gives them."""
    return run_main(cli.main, *args)


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit code 2, stderr one line ``error: ...`` naming each of ``words``, no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]
