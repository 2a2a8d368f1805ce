"""The numerical reference for the text encoders: transformers' CLIP text models built in this
process, with every parameter drawn by ``reference.init_every_parameter``."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from reference import init_every_parameter, mlx_weights
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection

from mlx_unet import CLIPTextConfig, CLIPTextModel, cpu
from mlx_unet.naming.clip import checkpoint_names
from mlx_unet.weights import load_weights

BOS, END = 49406, 49407  # CLIP's tokenizer: start and end of text, the two largest ids


def torch_text_class(config: CLIPTextConfig) -> type:
    return TorchCLIPTextModelWithProjection if config.with_projection else TorchCLIPTextModel


def torch_text_encoder(config: CLIPTextConfig, seed: int = 0) -> torch.nn.Module:
    """transformers' model for ``config`` with every parameter drawn from ``seed``; allocated once."""
    with torch.device("meta"):
        model = torch_text_class(config)(TorchCLIPTextConfig(**config.to_transformers_dict()))
    model = model.to_empty(device="cpu")
    # to_empty leaves buffers as uninitialised memory too. position_ids (0, 1, ...) is the only one;
    # a new buffer in a later transformers must be refilled here, not read as garbage.
    buffers = dict(model.named_buffers())
    assert [name.rsplit(".", 1)[-1] for name in buffers] == ["position_ids"], list(buffers)
    for buffer in buffers.values():
        buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    init_every_parameter(model, seed)
    return model.eval()


def mlx_text_encoder(state: dict[str, torch.Tensor], config: CLIPTextConfig, dtype=None) -> CLIPTextModel:
    """Our model with the weights of a transformers ``state_dict()``, renamed by the same rule a
    converter uses. ``state`` is emptied as it is copied (see ``reference.mlx_weights``)."""
    named = checkpoint_names(state)
    state.clear()  # ``named`` is now the only holder, emptied tensor by tensor
    ours = CLIPTextModel(config)
    load_weights(ours, mlx_weights(named, dtype or mx.float32, consume=True))
    return cpu.prepare(ours)


def token_ids(config: CLIPTextConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Tokenizer-like ids: start token, random words, the end token at a different place in each
    row, then padding: end tokens again on even rows (SDXL's first tokenizer), 0 on odd rows (its
    second). The end token is the config's eos_token_id, or 49407 under the legacy rule (eos 2),
    which pools at the largest id. Either way the other rule would pool somewhere else."""
    rng = np.random.default_rng(seed)
    end = END if config.eos_token_id == 2 else config.eos_token_id
    ids = rng.integers(0, BOS, (batch, length))
    ids[ids == end] = end + 1  # no early end token
    ids[:, 0] = BOS
    positions = rng.choice(np.arange(1, length - 1), size=batch, replace=False)
    positions[0] = length - 1  # one row without padding
    for row, position in enumerate(positions):
        ids[row, position] = end
        ids[row, position + 1:] = end if row % 2 == 0 else 0
    return ids.astype(np.int32)


@torch.no_grad()
def run_torch(model: torch.nn.Module, ids: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(every hidden state, as transformers numbers them; the pooled or projected output)."""
    out = model(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
    pooled = out.text_embeds if isinstance(model, TorchCLIPTextModelWithProjection) else out.pooler_output
    # .float(): numpy has no bfloat16.
    return tuple(h.float().numpy() for h in out.hidden_states), pooled.float().numpy()
