"""SDXL's two text encoders: transformers' CLIPTextModel and CLIPTextModelWithProjection in MLX.

SDXL's ``text_encoder`` is OpenAI's CLIP ViT-L/14 text tower (quick_gelu, no projection) and its
``text_encoder_2`` is OpenCLIP's ViT-bigG/14 one (exact GELU, ``text_projection`` without bias).
Both are the same pre-LayerNorm causal transformer, so one model built from a CLIPTextConfig
covers them.

Parameter names are the keys of the published ``text_encoder*/model.safetensors`` files, which
transformers 4.x wrote: ``text_model.embeddings.token_embedding.weight``, ...,
``text_projection.weight``. Two differences from other sources are left to the converter, and
:func:`mlx_unet.naming.clip.checkpoint_names` makes them: transformers 5 saves a bare CLIPTextModel without the
``text_model.`` prefix, and checkpoints from before transformers 4.31 also hold the
``text_model.embeddings.position_ids`` buffer (0..76), which is not a parameter.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..configs.clip import LEGACY_EOS_TOKEN_ID, CLIPTextConfig
from ..configs.quantization import Quantization, as_quantization
from ..errors import InputError


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), OpenAI CLIP's activation (transformers' quick_gelu)."""

    def __call__(self, x: mx.array) -> mx.array:
        return x * mx.sigmoid(1.702 * x)


# config.hidden_act -> the activation module (configs.clip.HIDDEN_ACTS lists these names).
_ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


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
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

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
        self.activation = _ACTIVATIONS[config.hidden_act]()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

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
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
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
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

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
    def from_pretrained(cls, folder: str | Path, dtype: mx.Dtype | None = None, cpu_kernels: bool | None = None,
                        quantize: Quantization | int | None = None) -> "CLIPTextModel":
        """Load ``config.json`` and the MLX ``*.safetensors`` weights of a text encoder folder.

        ``dtype`` casts the weights (default: as stored). ``cpu_kernels``: swap in the CPU
        kernels (None: on the CPU unless ``MLX_UNET_CPU_KERNELS=0``; see ``mlx_unet.cpu``).
        ``quantize``: as for ``UNet2DConditionModel.from_pretrained``.
        """
        from ..weights import load_pretrained

        folder = Path(folder)
        model = cls(CLIPTextConfig.from_json(folder))
        return load_pretrained(model, folder, dtype, cpu_kernels, as_quantization(quantize))

