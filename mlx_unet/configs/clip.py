"""CLIPTextConfig: a transformers CLIP text ``config.json``, parsed once and validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from .base import ModelConfig, check_choice, check_int, check_number, config_fields

HIDDEN_ACTS = ("quick_gelu", "gelu")  # the activations models/clip.py implements

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
    # Checked rather than honoured: it says whether the model ends in text_projection.
    "architectures": None,
    # Prunes attention heads on load (transformers' PreTrainedModel.prune_heads).
    "pruned_heads": {},
}

# Keys of a transformers config that a CLIP text encoder's forward pass never reads, so any value
# is accepted: CLIP's training settings (dropout, initialisation, bos and pad ids), the output
# format switches, head and task settings of other models, and the generation settings that
# transformers 4 wrote into every config.json (and 5 still reads past).
_INERT = frozenset({
    "attention_dropout", "dropout", "initializer_range", "initializer_factor", "bos_token_id", "pad_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "gradient_checkpointing", "use_cache", "chunk_size_feed_forward", "tie_word_embeddings",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
    "sep_token_id", "decoder_start_token_id", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "task_specific_params", "tokenizer_class", "prefix",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
})

# Configs written before transformers PR 24773 carry this wrong eos_token_id; transformers keeps
# their old pooling rule (the largest id, which CLIP's end-of-text token is) for them.
LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
    """The architecture fields of a transformers CLIP text ``config.json``.

    Other fields in such a file (dropout, initializer ranges, bos/pad ids, generation settings,
    dtype) never change a text encoder's output at inference, so they are read past; a key that
    transformers does not write is refused, as for the other models.
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

    model_name: ClassVar[str] = "text encoder"

    @property
    def architecture(self) -> str:
        return "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CLIPTextConfig":
        """Parse a transformers CLIP text config dict (as in a ``text_encoder/config.json``)."""
        # First, as diffusers' _class_name: a whole CLIPModel config would fail on its other keys.
        if isinstance(raw, dict) and raw.get("model_type", "clip_text_model") != "clip_text_model":
            hint = "; pass its 'text_config' entry" if "text_config" in raw else ""
            raise ConfigError(f"this config describes a {raw['model_type']!r} model, not a CLIP text encoder{hint}.")
        d = config_fields(raw, _DEFAULTS, "CLIP text", accepted=_INERT | {"model_type"})
        architectures = d["architectures"]
        if not isinstance(architectures, list) or len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
            raise ConfigError(
                f"config field 'architectures' = {architectures!r} must be [\"CLIPTextModel\"] or "
                "[\"CLIPTextModelWithProjection\"]: it says whether the model has a text_projection."
            )
        check_choice("pruned_heads", d["pruned_heads"], ({},))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            check_int(name, d[name])
        if d["hidden_size"] % d["num_attention_heads"]:
            raise ConfigError(
                f"hidden_size {d['hidden_size']} does not split into {d['num_attention_heads']} attention heads."
            )
        check_choice("hidden_act", d["hidden_act"], HIDDEN_ACTS)
        eos = d["eos_token_id"]
        if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < d["vocab_size"]:
            raise ConfigError(
                f"config field 'eos_token_id' must be one token id below vocab_size {d['vocab_size']}, "
                f"got {eos!r}; the pooled output is read at that token."
            )
        with_projection = ARCHITECTURES[architectures[0]]
        # A bare CLIPTextModel never reads projection_dim, so only the projecting one checks it.
        if with_projection:
            check_int("projection_dim", d["projection_dim"])
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            max_position_embeddings=d["max_position_embeddings"],
            hidden_act=d["hidden_act"],
            layer_norm_eps=check_number("layer_norm_eps", d["layer_norm_eps"], positive=True),
            projection_dim=d["projection_dim"],
            eos_token_id=eos,
            with_projection=with_projection,
        )

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

    library_dict = to_transformers_dict


# ---------------------------------------------------------------------- presets
# The architecture fields of the published SD and SDXL config.json files. All carry the legacy
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
    # SDXL's first text encoder, and SD 1.x's only one (openai/clip-vit-large-patch14's text model).
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
    # stabilityai/stable-diffusion-2-1, text_encoder/config.json: OpenCLIP ViT-H without its last
    # layer (SD 2.x conditions on the penultimate one) and without the projection.
    "sd2-clip-h": {
        **_SDXL_TEXT,
        "architectures": ["CLIPTextModel"],
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
        "projection_dim": 512,
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
CLIPTextConfig.presets = TEXT_PRESETS
