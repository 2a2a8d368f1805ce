"""A tiny random pipeline, made in MLX on the fly, for ``mlx-unet generate --demo``: the whole
path (CLIP's tokenizer on the vocabulary that ships with the package, two text encoders, UNet,
sampler, VAE, PNG with its parameters) runs on a fresh machine with nothing downloaded, in
seconds on a CPU.

The models have SDXL's structure at the widths of the "tiny" presets (``configs``), with weights
drawn from a fixed seed: the same pipeline every time, so a demo PNG reruns bit for bit with
``--from-png``. The weights are random, so the picture is a pattern, not a drawing of the prompt.
The pipeline is written to a temporary folder as ``mlx-unet convert`` writes one and loaded from
there like any converted pipeline.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlx.core as mx
from mlx.utils import tree_flatten

from .configs.clip import CLIPTextConfig
from .configs.unet import UNetConfig
from .configs.vae import VAEConfig
from .models.clip import CLIPTextModel
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL
from .convert.published import SDXL_BASE
from .tokenizer import bundled_tokenizer_files

WEIGHTS_SEED = 0  # the demo pipeline's weights: fixed, so that its images rerun exactly
MODEL_NAME = "mlx-unet-demo"  # what a demo PNG names as its model
PROMPT = "a lighthouse on a cliff at dusk, watercolour"
# Its runs' defaults where the command's would be slow for no gain (a random model draws nothing
# better with 30 steps); the tiny UNet's own size is 128 px.
RUN_DEFAULTS = {"steps": 10}
# (tokenizer, text encoder, preset) as SDXL pairs them; the files besides the weights (model
# index, scheduler, the tokenizers' pad tokens) are SDXL base's.
_ENCODERS = (("tokenizer", "text_encoder", "tiny-clip-l"), ("tokenizer_2", "text_encoder_2", "tiny-clip-bigg"))


def _save(folder: Path, model, config) -> None:
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


def write_demo_pipeline(folder: str | Path) -> Path:
    """The demo pipeline, written into the new folder ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir()
    mx.random.seed(WEIGHTS_SEED)
    encoders = [CLIPTextConfig.from_preset(preset) for _, _, preset in _ENCODERS]
    # The UNet's widths follow the encoders': their states side by side, the pooled embedding of
    # the second with SDXL's six size-and-crop numbers.
    unet = UNetConfig.from_preset(
        "tiny", cross_attention_dim=sum(c.hidden_size for c in encoders),
        projection_class_embeddings_input_dim=encoders[-1].projection_dim + 6 * 8)
    vae = VAEConfig.from_preset("tiny")
    _save(folder / "unet", UNet2DConditionModel(unet), unet)
    _save(folder / "vae", AutoencoderKL(vae), vae)
    for (tokenizer, encoder, _), config in zip(_ENCODERS, encoders):
        _save(folder / encoder, CLIPTextModel(config), config)
        (folder / tokenizer).mkdir()
        for name, content in bundled_tokenizer_files(SDXL_BASE.pads[tokenizer]).items():
            (folder / tokenizer / name).write_bytes(content)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_BASE.scheduler))
    index = SDXL_BASE.model_index([encoder for _, encoder, _ in _ENCODERS])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@contextmanager
def demo_pipeline() -> Iterator[Path]:
    """The demo pipeline in a temporary folder, removed after the ``with`` block."""
    with tempfile.TemporaryDirectory(prefix="mlx-unet-demo-") as root:
        yield write_demo_pipeline(Path(root) / "pipeline")
