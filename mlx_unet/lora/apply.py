"""A LoRA file applied to one model: matched, checked whole, then fused or attached.

Nothing changes until every module of the file that names a layer of the model has been found
to fit it (shapes, ranks, finite values): a rejected LoRA leaves the model bit for bit as it was.
File modules that name no layer are listed in a warning, or refused when none does.

Fused LoRAs on one model are undone in the reverse order they were fused in (each restore is
exact only on top of the weights its fuse left), so removing one fused before others takes those
off and puts them back: :class:`AppliedLoRA` keeps the order per model.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn

from ..configs.clip import CLIPTextConfig
from ..configs.families import cross_attention_family, text_encoder_family, unet_family
from ..errors import InputError, MlxUnetWarning, WeightsError
from ..models.clip import CLIPTextModel
from ..models.unet import UNet2DConditionModel
from ..naming.lora import TEXT_ENCODER, TEXT_ENCODER_2, UNET, Target, text_encoder_names, unet_names
from . import fuse as fusing
from .adapters import Adapter, check_fits, nonfinite
from .files import read_lora
from .formats import LoRAFile
from .layers import adaptable_layers, attach, base_of, detach, dtype_of, geometry, layer_at, torch_shape


@dataclass
class Update:
    """One layer's share of a LoRA: the adapter fitted to it, and what applying it left (the fused
    record, or the live branch)."""

    path: str
    adapter: Adapter
    record: fusing.Lost | None = None
    branch: nn.Module | None = None


@dataclass(frozen=True)
class Layers:
    """The adaptable layers of one model part: their names in every LoRA layout, PyTorch-layout
    weight shapes, and the part's family for messages."""

    part: str
    names: dict[str, list[Target]]
    shapes: dict[str, tuple[int, ...]]
    family: str
    width: int  # what tells families apart: the UNet's cross-attention width, a text encoder's


def model_layers(model: nn.Module, part: str | None = None) -> Layers:
    """The layers of a loaded UNet or text encoder (``part`` for a text encoder: text_encoder or
    text_encoder_2; by default the one with a projection is the second)."""
    shapes = {path: torch_shape(layer) for path, layer in adaptable_layers(model)}
    if isinstance(model, UNet2DConditionModel):
        if part not in (None, UNET):
            raise InputError(f"a UNet takes a LoRA's unet part, not {part!r}.")
        config = model.config
        return Layers(UNET, unet_names(config, shapes), shapes, unet_family(config), config.cross_attention_dim)
    if isinstance(model, CLIPTextModel):
        part = part or (TEXT_ENCODER_2 if model.config.with_projection else TEXT_ENCODER)
        return text_encoder_layers(model.config, part, shapes)
    raise InputError(f"a LoRA applies to a UNet2DConditionModel or CLIPTextModel, not a {type(model).__name__}.")


def text_encoder_layers(config: CLIPTextConfig, part: str,
                        shapes: Mapping[str, tuple[int, ...]] | None = None) -> Layers:
    """A text encoder's layers, from its config alone where ``shapes`` is not given (a pipeline
    checks a LoRA against encoders it loads only for the prompt)."""
    if part not in (TEXT_ENCODER, TEXT_ENCODER_2):
        raise InputError(f"a text encoder takes a LoRA's text_encoder or text_encoder_2 part, not {part!r}.")
    if shapes is None:
        width, inner = config.hidden_size, config.intermediate_size
        shapes = {}
        for i in range(config.num_hidden_layers):
            layer = f"text_model.encoder.layers.{i}"
            shapes.update({f"{layer}.self_attn.{p}": (width, width) for p in ("q_proj", "k_proj", "v_proj",
                                                                             "out_proj")})
            shapes.update({f"{layer}.mlp.fc1": (inner, width), f"{layer}.mlp.fc2": (width, inner)})
        if config.with_projection:
            shapes["text_projection"] = (config.projection_dim, width)
    return Layers(part, text_encoder_names(part, config, shapes), dict(shapes), text_encoder_family(config.hidden_size),
                  config.hidden_size)


def _lora_width(lora: LoRAFile, part: str) -> int | None:
    """The width that tells families apart, as the file has it: what its cross-attention keys and
    values take (a text encoder's attention); None where the file has no such module."""
    ends = ("attn2_to_k", "attn2_to_v", "attn2_processor_to_k", "attn2_processor_to_v") if part == UNET \
        else ("self_attn_q_proj", "self_attn_out_proj", "attn_out_proj")
    for module, adapter in lora.modules.get(part, {}).items():
        if module.replace(".", "_").endswith(ends):
            return adapter.sizes()[1]
    return None


def plan(lora: LoRAFile, layers: Layers) -> tuple[list[Update], list[str]]:
    """Each layer's update from ``lora``'s modules for ``layers.part``, and the file modules of that
    part that name no layer. Raises (changing nothing) where a module does not fit its layer."""
    updates, unmatched, problems = [], [], []
    for module, adapter in lora.modules.get(layers.part, {}).items():
        targets = layers.names.get(module)
        if not targets:
            unmatched.append(module)
            continue
        if nonfinite(adapter):
            raise WeightsError(f"{lora.name} has NaN or infinite values in {module}; download it again.")
        for target in targets:
            fitted = adapter.rows(*target.rows) if target.rows else adapter
            problem = check_fits(fitted, layers.shapes[target.path], module)
            if problem is not None:
                problems.append(problem)
            updates.append(Update(target.path, fitted))
    if problems:
        width = _lora_width(lora, layers.part)
        if width is not None and width != layers.width:
            made_for, what = (cross_attention_family(width), "UNet") if layers.part == UNET \
                else (text_encoder_family(width), "text encoder")
            raise WeightsError(f"{lora.name} is a LoRA for {made_for}, and this {what} is {layers.family}; "
                               "use a LoRA made for this model.")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise WeightsError(f"{lora.name} does not fit this model: {problems[0]}{more}.")
    return updates, unmatched


def report_unmatched(lora: LoRAFile, unmatched: list[str], matched: int) -> None:
    """Warn about file modules that name no layer; refuse the file when none does."""
    if not unmatched:
        return
    shown = ", ".join(unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
    if not matched:
        raise WeightsError(f"none of the {len(unmatched)} modules of {lora.name} ({lora.format}) names a layer of "
                           f"this model ({shown}); it is a LoRA for another kind of model.")
    warnings.warn(MlxUnetWarning(f"{len(unmatched)} of {len(unmatched) + matched} modules of {lora.name} name no layer "
                                 f"of this model and are left out ({shown})."), stacklevel=3)


# Fused LoRAs per model (by id: modules are dicts, neither hashable nor weak keys), in fuse order.
_FUSED: dict[int, list["AppliedLoRA"]] = {}


def _check_fusable(model: nn.Module, updates: list[Update]) -> None:
    for update in updates:
        if isinstance(base_of(layer_at(model, update.path)), nn.QuantizedLinear):
            raise InputError(f"{update.path} is quantized, and fusing a LoRA into quantized weights would round "
                             "it away; load the LoRA live (fuse=False, --lora-mode live).")


class AppliedLoRA:
    """One LoRA file's part applied to one model, applied when made (from the updates
    :func:`plan` checked); ``remove()`` takes it off (fused: bit for bit), ``set_scale(s)``
    changes its strength."""

    def __init__(self, model: nn.Module, lora: LoRAFile, part: str, updates: list[Update], scale: float, fuse: bool):
        self._model = weakref.ref(model)
        self.lora, self.part, self.fused = lora, part, fuse
        self.updates = [Update(u.path, u.adapter) for u in updates]
        self.scale = checked_scale(scale)
        if fuse:
            _check_fusable(model, self.updates)
            self._fuse()
            _FUSED.setdefault(id(model), []).append(self)
            if len(_FUSED[id(model)]) == 1:
                weakref.finalize(model, _FUSED.pop, id(model), None)
        else:
            self._attach()
        self.active = True

    @property
    def modules(self) -> int:
        """How many layers this LoRA updates."""
        return len(self.updates)

    def _fuse(self) -> None:
        model = self._model()
        for update in self.updates:
            update.record = fusing.fuse(layer_at(model, update.path), update.adapter, self.scale)

    def _unfuse(self) -> None:
        model = self._model()
        for update in reversed(self.updates):
            fusing.unfuse(layer_at(model, update.path), update.adapter, self.scale, update.record)
            update.record = None

    def _attach(self) -> None:
        model = self._model()
        for update in self.updates:
            layer = layer_at(model, update.path)
            update.branch = update.adapter.branch(torch_shape(layer), geometry(layer), dtype_of(layer))
            update.branch.scale = self._branch_scale(update)
            attach(model, update.path, update.branch)
            mx.eval(update.branch.parameters())

    def _branch_scale(self, update: Update) -> mx.array:
        return mx.array(self.scale * update.adapter.scale, dtype=mx.float32)

    def remove(self) -> None:
        """Take this LoRA off the model (a no-op once removed, or once the model is gone)."""
        model = self._model()
        if not self.active or model is None:
            return
        if self.fused:
            stack = _FUSED[id(model)]
            later = stack[stack.index(self) + 1:]
            for other in reversed(later):
                other._unfuse()
            self._unfuse()
            for other in later:
                other._fuse()
            stack.remove(self)
        else:
            for update in self.updates:
                detach(model, update.path, update.branch)
                update.branch = None
        self.active = False

    def set_scale(self, scale: float) -> None:
        """Change the strength: live, at once (no compiled forward is traced again); fused, by
        taking it off and fusing it again, on top of any fused after it."""
        scale = checked_scale(scale)
        if self.active and self.fused:
            self.remove()
            self.scale = scale
            self._fuse()
            _FUSED[id(self._model())].append(self)
            self.active = True
            return
        self.scale = scale
        if self.active:
            for update in self.updates:
                update.branch.scale = self._branch_scale(update)


def checked_scale(scale) -> float:
    """``scale`` as a float, after checking it is a plain finite number in a sane range."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -100 <= scale <= 100:
        raise InputError(f"a LoRA scale must be a finite number from -100 to 100, got {scale!r}.")
    return float(scale)


def apply_lora(model: nn.Module, lora: LoRAFile | str, *, part: str | None = None, scale: float = 1.0,
               fuse: bool = True, allow_pickle: bool = False) -> AppliedLoRA:
    """Apply ``lora`` (a :class:`LoRAFile` or a file, folder or Hub id) to a UNet or text encoder.

    ``part``: which of the file's parts (default: "unet" for a UNet; for a text encoder
    "text_encoder_2" when it has a projection, else "text_encoder"). ``fuse=True`` adds the
    update to the weights (no cost per step); ``fuse=False`` wraps the layers (live: scale
    changes without reloading, works over quantized layers). Other parts of the file are left
    out silently: the pipeline's ``load_lora`` applies a file whole.
    """
    layers = model_layers(model, part)
    checked_scale(scale)
    if not isinstance(lora, LoRAFile):
        lora = read_lora(lora, allow_pickle=allow_pickle)
    if layers.part not in lora.parts:
        raise WeightsError(f"{lora.name} has no {layers.part} modules (it has {', '.join(lora.parts)}).")
    updates, unmatched = plan(lora, layers)
    report_unmatched(lora, unmatched, len(updates))
    return AppliedLoRA(model, lora, layers.part, updates, scale, fuse)
