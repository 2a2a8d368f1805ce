"""The text encoders' layouts <-> transformers' CLIPTextModel(WithProjection) names, ours.

- transformers' own, as files hold it: transformers 4.x wrote ``text_model.embeddings...``,
  transformers 5 saves a bare CLIPTextModel without ``text_model.``, and checkpoints from before
  4.31 also hold the ``position_ids`` buffer (0..76), which is not a parameter. sgm's SDXL files
  store CLIP ViT-L so, under ``conditioner.embedders.0.transformer.``.
- open_clip's, in which sgm's SDXL files store ViT-bigG (``conditioner.embedders.N.model.``):
  ``transformer.resblocks.N`` layers with q, k and v fused in one ``in_proj``, and
  ``text_projection`` as the matrix that multiplies the pooled token from the right.

ldm's SD 1.x files store CLIP ViT-L in transformers' layout under ``cond_stage_model.transformer.``,
SD 2.x files OpenCLIP ViT-H in open_clip's under ``cond_stage_model.model.``.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

from ..configs.clip import CLIPTextConfig
from .table import NameTable, Take

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
# ViT-bigG is the second embedder of the base, the only one of the refiner.
OPEN_CLIP_PREFIX = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
LDM_TEXT_PREFIX = "cond_stage_model."
LDM_CLIP_PREFIX = LDM_TEXT_PREFIX + "transformer."  # SD 1.x
LDM_OPEN_CLIP_PREFIX = LDM_TEXT_PREFIX + "model."  # SD 2.x

T = TypeVar("T")
_TRANSFORMER_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
_POSITION_IDS = "text_model.embeddings.position_ids"
# Stored beside the parameters, but none: the position ids buffer, open_clip's causal mask buffer
# (should a file hold it), and CLIP's contrastive temperature (it scales image-text similarities,
# never the text features).
_NOT_PARAMETERS = ("position_ids", "attn_mask", "logit_scale")


def _our_name(key: str) -> str | None:
    """A transformers CLIP text key under our parameter name; None for the position ids buffer."""
    if key.startswith(_TRANSFORMER_PARTS):
        key = "text_model." + key
    return None if key == _POSITION_IDS else key


def checkpoint_names(weights: Mapping[str, T]) -> dict[str, T]:
    """A transformers CLIP text checkpoint (file or ``state_dict()``) under our parameter names.
    Tensors are passed through as they are (the layout is the same in MLX: there are no
    convolutions)."""
    return {ours: value for key, value in weights.items() if (ours := _our_name(key)) is not None}


class CLIPNames(NameTable):
    """transformers' layout, kept: the table only says which modules the config has, and reads
    transformers 5's bare names and the old files' position ids as :func:`checkpoint_names` does."""

    not_parameters = _NOT_PARAMETERS

    def __init__(self, config: CLIPTextConfig, prefix: str = CLIP_L_PREFIX):
        layers = [f"text_model.encoder.layers.{i}" for i in range(config.num_hidden_layers)]
        modules = {m: m for m in ("text_model.embeddings", "text_model.final_layer_norm", *layers)}
        if config.with_projection:
            modules["text_projection"] = "text_projection"
        super().__init__(modules, prefix)

    def to_diffusers(self, name: str) -> str | None:
        ours = _our_name(name)
        return None if ours is None else super().to_diffusers(ours)


# transformers' CLIPEncoderLayer -> open_clip's ResidualAttentionBlock.
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn": "attn",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding": "token_embedding",
    "text_model.final_layer_norm": "ln_final",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def _fused(parameter: str) -> tuple[str, int, str] | None:
    """``(attention module, i, weight|bias)`` of the i-th of q/k/v; None for other names."""
    attention, found, projection = parameter.rpartition(".self_attn.")
    proj, _, param = projection.partition(".")
    if not found or proj not in _QKV or param not in ("weight", "bias"):
        return None
    return f"{attention}.self_attn", _QKV.index(proj), param


class OpenCLIPNames(NameTable):
    """open_clip's text tower: ``transformer.resblocks.3.mlp.c_fc`` <-> ``text_model.encoder.layers.3.mlp.fc1``.

    nn.MultiheadAttention keeps q, k and v as one ``in_proj_weight`` / ``in_proj_bias`` (stacked in
    that order), so each of transformers' q/k/v projections is a third of it and has no name of
    its own there. The position embedding and the projection are bare tensors in open_clip.
    """

    not_parameters = _NOT_PARAMETERS

    def __init__(self, config: CLIPTextConfig, prefix: str = OPEN_CLIP_PREFIX["base"]):
        modules = dict(_OPEN_CLIP_TOP)
        for i in range(config.num_hidden_layers):
            layer = f"text_model.encoder.layers.{i}"
            modules[layer] = f"transformer.resblocks.{i}"
            modules.update({f"{layer}.{a}": f"transformer.resblocks.{i}.{b}" for a, b in _OPEN_CLIP_LAYER.items()})
        self.tensors = {"text_model.embeddings.position_embedding.weight": "positional_embedding"}
        if config.with_projection:
            self.tensors["text_projection.weight"] = "text_projection"
        self.tensor_names = {source: ours for ours, source in self.tensors.items()}
        super().__init__(modules, prefix)

    def to_source(self, name: str) -> str | None:
        if name in self.tensors:
            return self.tensors[name]
        return None if _fused(name) else super().to_source(name)

    def to_diffusers(self, name: str) -> str | None:
        if name in self.tensor_names:
            return self.tensor_names[name]
        return None if name.endswith((".in_proj_weight", ".in_proj_bias")) else super().to_diffusers(name)

    def take(self, parameter: str) -> Take | None:
        fused = _fused(parameter)
        if fused is None:
            return super().take(parameter)
        attention, index, param = fused
        block = self.to_source(attention)
        return None if block is None else Take(f"{self.prefix}{block}.in_proj_{param}", rows=(index, 3))

    def parameters(self, key: str) -> dict[str, Take]:
        block, found, param = key.removeprefix(self.prefix).rpartition(".in_proj_")
        attention = self.to_diffusers(block) if key.startswith(self.prefix) and found else None
        if attention is None or param not in ("weight", "bias"):
            return super().parameters(key)
        return {f"{attention}.{proj}.{param}": Take(key, rows=(i, 3)) for i, proj in enumerate(_QKV)}

    def _how(self, parameter: str) -> dict:
        return {"transpose": True} if parameter == "text_projection.weight" else {}


def penultimate_left_alone(config: CLIPTextConfig, prefix: str) -> tuple[str, ...]:
    """The starts of the open_clip keys a penultimate-layer text encoder (SD 2.x's: ``config``
    has one layer fewer than the file) does not use: the last layer, and the projection, which
    only the pooled output it never reads goes through."""
    return f"{prefix}transformer.resblocks.{config.num_hidden_layers}.", f"{prefix}text_projection"
