"""SDXL's two text encoders: transformers' CLIPTextModel and CLIPTextModelWithProjection in MLX.

SDXL's ``text_encoder`` is OpenAI's CLIP ViT-L/14 text tower (quick_gelu, no projection) and its
``text_encoder_2`` is OpenCLIP's ViT-bigG/14 one (exact GELU, ``text_projection`` without bias).
Both are the same pre-LayerNorm causal transformer, so one model built from a CLIPTextConfig
covers them.

Parameter names are the keys of the published ``text_encoder*/model.safetensors`` files, which
transformers 4.x wrote: ``text_model.embeddings.token_embedding.weight``, ...,
``text_projection.weight``. Two differences from other sources are left to the converter, and
:func:`checkpoint_names` makes them: transformers 5 saves a bare CLIPTextModel without the
``text_model.`` prefix, and checkpoints from before transformers 4.31 also hold the
``text_model.embeddings.position_ids`` buffer (0..76), which is not a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import mlx.core as mx
import mlx.nn as nn

from .activations import gelu, silu
from .config import ConfigError, positive_int, preset, read_config_json
from .linear import Linear
from .unet import InputError

# transformers' architecture name -> whether the model ends in text_projection.
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}

# transformers' CLIPTextConfig defaults: a field missing from config.json has this value there.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}

# Configs written before transformers PR 24773 carry this wrong eos_token_id; transformers keeps
# their old pooling rule (the largest id, which CLIP's end-of-text token is) for them.
_LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x), OpenAI CLIP's activation, as silu(1.702 x) / 1.702 (the fast SiLU)
    in float32, so a half-precision input is rounded once, at the end."""
    y = x.astype(mx.float32) * 1.702
    return (silu(y) / 1.702).astype(x.dtype)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


@dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of a transformers CLIP text ``config.json``.

    Other fields in such a file (dropout, initializer ranges, bos/pad ids, generation settings,
    dtype) never change a text encoder's output at inference, so they are read past.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    projection_dim: int | None
    eos_token_id: int
    with_projection: bool

    @property
    def architecture(self) -> str:
        return "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CLIPTextConfig":
        """Parse a transformers CLIP text config dict (as in a ``text_encoder/config.json``)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a CLIP text config must be a JSON object, got {type(raw).__name__}.")
        model_type = raw.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            hint = "; pass its 'text_config' entry" if "text_config" in raw else ""
            raise ConfigError(f"this config describes a {model_type!r} model, not a CLIP text encoder{hint}.")
        architectures = raw.get("architectures")
        if not isinstance(architectures, list) or len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
            raise ConfigError(
                f"config field 'architectures' = {architectures!r} must be [\"CLIPTextModel\"] or "
                "[\"CLIPTextModelWithProjection\"]: it says whether the model has a text_projection."
            )
        d = {**_DEFAULTS, **{k: raw[k] for k in _DEFAULTS if k in raw}}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            positive_int(name, d[name])
        if d["hidden_size"] % d["num_attention_heads"]:
            raise ConfigError(
                f"hidden_size {d['hidden_size']} does not split into {d['num_attention_heads']} attention heads."
            )
        if d["hidden_act"] not in _ACTIVATIONS:
            raise ConfigError(
                f"config field 'hidden_act' = {d['hidden_act']!r} is not supported; "
                f"supported: {', '.join(_ACTIVATIONS)}."
            )
        eps = d["layer_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError(f"config field 'layer_norm_eps' must be a positive number, got {eps!r}.")
        eos = d["eos_token_id"]
        if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < d["vocab_size"]:
            raise ConfigError(
                f"config field 'eos_token_id' must be one token id below vocab_size {d['vocab_size']}, "
                f"got {eos!r}; the pooled output is read at that token."
            )
        with_projection = ARCHITECTURES[architectures[0]]
        # A bare CLIPTextModel never reads projection_dim, so only the projecting one checks it.
        if with_projection:
            positive_int("projection_dim", d["projection_dim"])
        return cls(**{**d, "layer_norm_eps": float(eps)}, with_projection=with_projection)

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPTextConfig":
        """Parse a ``config.json`` file, or the one inside a folder."""
        return cls.from_dict(read_config_json(path, "text encoder"))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "CLIPTextConfig":
        """One of ``TEXT_PRESETS`` (transformers field names), optionally with fields overridden."""
        return cls.from_dict({**preset(TEXT_PRESETS, name, "text encoder"), **overrides})

    def to_transformers_dict(self) -> dict[str, Any]:
        """The config in transformers' field names: ``transformers.CLIPTextConfig(**d)`` builds the
        reference, and ``json.dump(d)`` writes a config.json that both libraries read."""
        return {
            "architectures": [self.architecture],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "projection_dim": self.projection_dim,
            "eos_token_id": self.eos_token_id,
        }


# ---------------------------------------------------------------------- presets
# The architecture fields of the published SDXL config.json files. Both carry the legacy
# eos_token_id 2 (and bos 0, pad 1), so their pooled token is the largest id: end-of-text.

_SDXL_TEXT = {
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "sdxl-clip-l": {
        **_SDXL_TEXT,
        "architectures": ["CLIPTextModel"],
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "sdxl-clip-bigg": {
        **_SDXL_TEXT,
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    },
}
# The same structures at a width that runs in milliseconds, for tests and smoke runs. The full
# vocabulary is kept (a few MB), so real token ids run through them.
TEXT_PRESETS["tiny-clip-l"] = {
    **TEXT_PRESETS["sdxl-clip-l"], "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "projection_dim": 48,
}
TEXT_PRESETS["tiny-clip-bigg"] = {
    **TEXT_PRESETS["sdxl-clip-bigg"], "hidden_size": 40, "intermediate_size": 160, "num_hidden_layers": 4,
    "num_attention_heads": 5, "projection_dim": 24,
}


# ---------------------------------------------------------------------- model


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention; q/k/v/out projections all with bias."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.scale = (width // self.heads) ** -0.5
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def _split_heads(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3).astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # In float32 whatever the weights' dtype, as transformers' softmax: the scores over 77
        # tokens are few, and half-precision ones lose digits the pooled token depends on.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1).astype(x.dtype))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm: attention then MLP, each added to the residual."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x: mx.array, keep: int) -> tuple[mx.array, mx.array]:
        """(the hidden state after ``keep`` layers, 0 being the embeddings; the last one)."""
        kept = x
        for index, layer in enumerate(self.layers, start=1):
            x = layer(x)
            if index == keep:
                kept = x
        return kept, x


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def eos_positions(self, input_ids: mx.array) -> mx.array:
        """The end-of-text position of each sequence: the first one (argmax returns the first of
        ties, as torch's does; SDXL's first tokenizer pads with end-of-text tokens)."""
        if self.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            return mx.argmax(input_ids, axis=-1)
        # A sequence without the token pools position 0, as in transformers.
        return mx.argmax((input_ids == self.eos_token_id).astype(mx.uint8), axis=-1)

    def __call__(self, input_ids: mx.array, keep: int) -> tuple[mx.array, mx.array]:
        kept, last = self.encoder(self.embeddings(input_ids), keep)
        tokens = last[mx.arange(last.shape[0]), self.eos_positions(input_ids)]
        # final_layer_norm acts per token, so normalising only the pooled ones is the same.
        return kept, self.final_layer_norm(tokens)


class CLIPTextModel(nn.Module):
    """A CLIP text encoder, with ``text_projection`` when the config's architecture has one.

    Call: ``model(input_ids, hidden_layer=-2)`` with integer ids (B, L) returns
    ``(hidden, pooled)``: ``hidden`` is transformers' ``hidden_states[hidden_layer]`` (B, L, width),
    where index 0 is the embeddings, i the output of layer i, and -1 the last layer's output
    *before* final_layer_norm (SDXL conditions the UNet on -2 of both encoders); ``pooled`` is the
    final-normed end-of-text token (B, width), or its projection (B, projection_dim).
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.with_projection:
            self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    @property
    def dtype(self) -> mx.Dtype:
        return self.text_model.embeddings.token_embedding.weight.dtype

    def __call__(self, input_ids: mx.array, hidden_layer: int = -2) -> tuple[mx.array, mx.array]:
        keep = self._check_inputs(input_ids, hidden_layer)
        hidden, pooled = self.text_model(input_ids, keep)
        if self.config.with_projection:
            pooled = self.text_projection(pooled)
        return hidden, pooled

    def _check_inputs(self, input_ids, hidden_layer) -> int:
        """Validate the call; return ``hidden_layer`` as a count of layers (0 to num_hidden_layers)."""
        c = self.config
        if not isinstance(input_ids, mx.array):
            raise InputError(
                f"input_ids must be an mlx array of token ids, got {type(input_ids).__name__}; wrap it in mx.array()."
            )
        if input_ids.ndim != 2 or 0 in input_ids.shape:
            hint = "; add the batch axis with input_ids[None]" if input_ids.ndim == 1 else ""
            raise InputError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}{hint}.")
        if not mx.issubdtype(input_ids.dtype, mx.integer):
            raise InputError(
                f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; "
                "pass the tokenizer's ids, e.g. input_ids.astype(mx.int32)."
            )
        if input_ids.shape[1] > c.max_position_embeddings:
            raise InputError(
                f"input_ids has {input_ids.shape[1]} tokens but this encoder takes at most "
                f"{c.max_position_embeddings}; tokenize with truncation to that length."
            )
        low, high = input_ids.min().item(), input_ids.max().item()
        if low < 0 or high >= c.vocab_size:
            bad = low if low < 0 else high
            raise InputError(
                f"input_ids holds token id {bad}, outside this encoder's vocabulary 0..{c.vocab_size - 1}; "
                "use the tokenizer that belongs to it."
            )
        layers = c.num_hidden_layers
        if isinstance(hidden_layer, bool) or not isinstance(hidden_layer, int) or not -layers - 1 <= hidden_layer <= layers:
            raise InputError(
                f"hidden_layer must be an int from {-layers - 1} to {layers} (the {layers + 1} hidden states: "
                f"embeddings, then each layer), got {hidden_layer!r}."
            )
        return hidden_layer % (layers + 1)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: mx.Dtype | None = None) -> "CLIPTextModel":
        """Load ``config.json`` and the MLX ``*.safetensors`` weights of a text encoder folder.

        ``dtype`` casts the weights (default: as stored).
        """
        from .weights import load_weights_folder

        folder = Path(folder)
        model = cls(CLIPTextConfig.from_json(folder))
        load_weights_folder(model, folder, dtype)
        return model


# ---------------------------------------------------------------------- checkpoint names

T = TypeVar("T")
_TRANSFORMER_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
_POSITION_IDS = "text_model.embeddings.position_ids"


def checkpoint_names(weights: Mapping[str, T]) -> dict[str, T]:
    """A transformers CLIP text checkpoint (file or ``state_dict()``) under our parameter names:
    the ``text_model.`` prefix added where transformers 5 leaves it out, and the
    ``position_ids`` buffer of pre-4.31 checkpoints dropped. Tensors are passed through as they
    are (the layout is the same in MLX: there are no convolutions)."""
    named = {}
    for key, value in weights.items():
        if key.startswith(_TRANSFORMER_PARTS):
            key = "text_model." + key
        if key != _POSITION_IDS:
            named[key] = value
    return named
