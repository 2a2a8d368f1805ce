"""Quantized output (``convert --quantize``): which models are quantized how, checked before
anything is read; and the tensors of a quantized layer, produced while streaming.

The UNet is quantized as asked; the text encoders at 8 bits by default, in the same group size
and mode family (``configs.quantization.text_encoder_quantization``: affine stays affine, mxfp8
beside an mx mode), or as ``quantize_text_encoders`` says (8, 4, or False / "none": dense); the
VAE stays dense.
Which layers: ``mlx_unet.quantize``'s policy (``quantizable_paths``), the same one that quantizes
a dense folder as it loads, on the model built lazily from the plan's config.

Streaming: a quantized layer's weight becomes three tensors, ``<path>.weight`` (uint32, packed),
``<path>.scales`` and, in affine mode, ``<path>.biases``, written next to each other. Their specs
share one ``_SharedQuantization``: the first of them to be written reads the dense weight (once),
quantizes it and evaluates the three; each spec then takes its part and drops it. So the writer
holds at most one dense tensor (plus its few quantized parts) at a time, as for dense output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from ..configs.quantization import Quantization, text_encoder_quantization
from ..errors import ConversionError
from ..quantize import quantizable_paths, quantize_weights
from ..safetensors_io import TensorSpec

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class QuantizationChoice:
    """What a conversion quantizes: the UNet's and the text encoders' settings (None: dense)."""

    unet: Quantization | None = None
    text_encoders: Quantization | None = None
    text_asked: bool = False  # quantize_text_encoders asked for quantized text encoders explicitly

    def for_model(self, component: str) -> Quantization | None:
        """``component``: "unet" (or "" for a UNet alone), a text encoder, "vae"."""
        if component in ("", "unet"):
            return self.unet
        if component in TEXT_ENCODERS:
            return self.text_encoders
        return None


def _dense(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.lower() == "none")


def choose_quantization(quantize: Quantization | int | None, q_group_size: int | None, q_mode: str | None,
                        quantize_text_encoders: Any, unet_only: bool) -> QuantizationChoice:
    """The conversion's quantization options, checked (each mistake one sentence), before anything
    is read. ``quantize``: bits (8 or 4) or a ``Quantization``; ``q_group_size`` / ``q_mode``: its
    group size (default: the mode's, 64 for affine) and mode (default affine);
    ``quantize_text_encoders``: as ``text_encoder_quantization`` takes it."""
    text_given = quantize_text_encoders is not None
    text_asked = text_given and not _dense(quantize_text_encoders)
    if text_given and unet_only:
        raise ConversionError("--quantize-text-encoders is for whole pipelines; drop it with --unet-only.")
    if quantize is None:
        extra = [flag for flag, given in (("--q-group-size", q_group_size is not None),
                                          ("--q-mode", q_mode not in (None, "affine")),
                                          ("--quantize-text-encoders", text_asked)) if given]
        if extra:
            raise ConversionError(f"{' and '.join(extra)} {'go' if len(extra) > 1 else 'goes'} with --quantize (the "
                                  "UNet's quantization); add --quantize 8 or --quantize 4, or drop "
                                  f"{'them' if len(extra) > 1 else 'it'}.")
        return QuantizationChoice()
    if isinstance(quantize, Quantization):
        if q_group_size is not None or q_mode not in (None, "affine", quantize.mode):
            raise ConversionError("quantize= is a Quantization already; give its group size and mode there, not as "
                                  "q_group_size= / q_mode=.")
        unet = Quantization.make(quantize.bits, quantize.group_size, quantize.mode)
    else:
        unet = Quantization.make(quantize, q_group_size, q_mode or "affine")
    return QuantizationChoice(unet, text_encoder_quantization(unet, quantize_text_encoders), text_asked)


@dataclass
class ModelQuantization:
    """How one model of a conversion is quantized: its settings and the layers the policy takes."""

    quantization: Quantization
    paths: set[str]
    linear_layers: int  # all its Linear layers, for the log

    def describe(self) -> str:
        return f"{self.quantization.describe()} ({len(self.paths)} of {self.linear_layers} Linear layers)"


def model_quantization(model: nn.Module, quantization: Quantization) -> ModelQuantization:
    """The policy's layers of ``model`` (built lazily: nothing is evaluated)."""
    linear = sum(isinstance(m, nn.Linear) for _, m in model.named_modules())
    return ModelQuantization(quantization, quantizable_paths(model, quantization), linear)


class _SharedQuantization:
    """One dense weight's quantized parts, computed on the first request and handed out once each."""

    def __init__(self, name: str, read: Callable[[], mx.array], quantization: Quantization):
        self.name, self.read, self.quantization = name, read, quantization
        self.parts: dict[str, mx.array] | None = None

    def take(self, key: str) -> mx.array:
        if self.parts is None:
            path = self.name[: -len(".weight")]
            # The dense weight, read and cast once; it is freed when this returns (its parts,
            # evaluated, no longer refer to it).
            self.parts = quantize_weights({self.name: self.read()}, {path}, self.quantization, None)
            mx.eval(*self.parts.values())
        return self.parts.pop(key)


def quantized_specs(name: str, shape: tuple[int, ...], dtype: mx.Dtype, quantization: Quantization,
                    read: Callable[[], mx.array]) -> list[TensorSpec]:
    """The specs of weight ``name`` (dense ``shape``, ``dtype``) quantized, in the order they are
    written: ``.weight``, ``.scales``, ``.biases`` (affine). Their shapes and dtypes are MLX's own,
    from a lazy quantization of a placeholder that is never evaluated."""
    path = name[: -len(".weight")]
    placeholder = quantize_weights({name: mx.zeros(shape, dtype)}, {path}, quantization, None)
    shared = _SharedQuantization(name, read, quantization)
    return [TensorSpec(key, tuple(value.shape), value.dtype, lambda key=key: shared.take(key))
            for key, value in placeholder.items()]


def summary(quantized: dict[str, ModelQuantization], components: list[str]) -> str:
    """What was quantized, for the final log line: "unet: 8-bit affine, groups of 64; text
    encoders: 8-bit affine, groups of 64; vae dense"."""
    parts = []
    unet = quantized.get("unet")
    parts.append(f"unet: {unet.quantization.describe()}" if unet else "unet dense")
    encoders = [c for c in components if c in TEXT_ENCODERS]
    if encoders:
        settings = {quantized[c].quantization.describe() if c in quantized else "dense" for c in encoders}
        what = "text encoders" if len(encoders) > 1 else "text encoder"
        if len(settings) == 1:
            (setting,) = settings
            parts.append(f"{what}: {setting}" if setting != "dense" else f"{what} dense")
        else:
            parts.extend(f"{c}: {quantized[c].quantization.describe()}" if c in quantized else f"{c} dense"
                         for c in encoders)
    if "vae" in components:
        parts.append("vae dense")
    return "; ".join(parts)
