"""Random LoRA files for the tiny diffusers SDXL components of ``pipeline_files``, in the formats
people download, and the definition of what each does, applied by hand to torch models.

A LoRA is built first as a ``Spec``: for each part (``unet``, ``text_encoder``,
``text_encoder_2``) and each targeted module (named as in the torch model; the text encoders'
under ``text_model.``, as transformers 4 named them and as LoRA files name them), a ``Pair``
of seeded random matrices and an optional alpha. Writers then store the same spec in each
format. Every tensor is non-zero (training initialises ``up`` to zero; a test must not), and
the magnitudes make each module's weight change by about ``STRENGTH`` of its own size.

The definition (kohya's sd-scripts, PEFT, diffusers): the module's weight ``W`` becomes
``W + scale * alpha / rank * up @ down``, with ``up @ down`` taken over the rank axis and, for
convolutions, reshaped to the kernel's shape (``down`` (r, in, kh, kw), ``up`` (out, r, 1, 1)).
A missing alpha means alpha = rank.

The sgm (original SDXL) names kohya writes for SDXL are computed here from the UNet config by
walking the blocks, independently of ``mlx_unet.naming`` and of diffusers' converter.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

PARTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
TEXT_MODEL = "text_model."
STRENGTH = 0.25  # relative size of each module's weight change (at scale 1)

# Module kinds a LoRA targets, by their names in diffusers' UNet / transformers' CLIP.
UNET_KINDS: dict[str, str] = {
    "attention": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "feed_forward": r"\.ff\.net\.(0\.proj|2)$",
    "proj": r"\.attentions\.\d+\.(proj_in|proj_out)$",
    "resnet_conv": r"\.resnets\.\d+\.conv[12]$",  # LoCon: 3x3 kernels
    "conv_shortcut": r"\.resnets\.\d+\.conv_shortcut$",  # 1x1 convolutions
    "time_emb_proj": r"\.resnets\.\d+\.time_emb_proj$",
    "sampler": r"\.(downsamplers|upsamplers)\.0\.conv$",
    "time_embedding": r"^time_embedding\.linear_[12]$",
    "add_embedding": r"^add_embedding\.linear_[12]$",
    "conv_in": r"^conv_in$",
    "conv_out": r"^conv_out$",
}
TEXT_KINDS: dict[str, str] = {
    "attention": r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
    "mlp": r"\.mlp\.(fc1|fc2)$",
}


@dataclass(frozen=True)
class Pair:
    """One module's LoRA: ``down`` (r, in) or (r, in, kh, kw), ``up`` (out, r) or (out, r, 1, 1);
    ``alpha`` None when the file stores none (which means alpha = rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def conv(self) -> bool:
        return self.down.ndim == 4

    def factor(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """The change of the module's weight (in the weight's shape), in float64."""
        down, up = self.down.double(), self.up.double()
        if self.conv:
            product = up.flatten(1) @ down.flatten(1)
            return scale * self.factor() * product.reshape(up.shape[0], *down.shape[1:])
        return scale * self.factor() * (up @ down)


Spec = dict[str, dict[str, Pair]]  # part -> module name -> pair


def count(spec: Spec) -> dict[str, int]:
    """Modules per part, the parts that have any."""
    return {part: len(pairs) for part, pairs in spec.items() if pairs}


# ---------------------------------------------------------------------------------- targets


def module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``name`` in ``model``; text-encoder names may carry ``text_model.``, which transformers 5's
    bare CLIPTextModel no longer has."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        if not name.startswith(TEXT_MODEL):
            raise
        return model.get_submodule(name[len(TEXT_MODEL):])


def targets(model: torch.nn.Module, part: str, kinds) -> list[str]:
    """The names of every module of ``kinds`` in ``model`` (text encoders' under ``text_model.``)."""
    table = UNET_KINDS if part == "unet" else TEXT_KINDS
    patterns = [re.compile(table[kind]) for kind in kinds]
    names = []
    for name, m in model.named_modules():
        if part != "unet" and not name.startswith(TEXT_MODEL):
            name = TEXT_MODEL + name
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(p.search(name) for p in patterns):
            names.append(name)
    return names


def kind_of(part: str, name: str) -> str:
    table = UNET_KINDS if part == "unet" else TEXT_KINDS
    (kind,) = [kind for kind, pattern in table.items() if re.search(pattern, name)]
    return kind


AlphaRule = Callable[[str, str, int, int], float | None]  # (part, name, index, rank) -> alpha


def random_spec(models: dict[str, torch.nn.Module], kinds: dict[str, list[str]], seed: int,
                ranks: tuple[int, ...] = (4,), alpha: AlphaRule = lambda part, name, i, rank: None,
                strength: float = STRENGTH) -> Spec:
    """A seeded random LoRA on every module of ``kinds[part]`` in ``models[part]``; module ``i``
    of a part gets rank ``ranks[i % len(ranks)]`` and ``alpha(part, name, i, rank)``. Drawn so
    that ``alpha / rank * up @ down`` has about ``strength`` times the spread of the weight
    (which reference.init_every_parameter draws with variance 1 / fan_in)."""
    rng = np.random.default_rng(seed)
    spec: Spec = {}
    for part in PARTS:
        if part not in kinds:
            continue
        spec[part] = {}
        for i, name in enumerate(targets(models[part], part, kinds[part])):
            weight = module(models[part], name).weight
            rank = ranks[i % len(ranks)]
            a = alpha(part, name, i, rank)
            factor = (rank if a is None else a) / rank
            out_features, fan_in = weight.shape[0], weight[0].numel()
            down_shape = (rank, *weight.shape[1:])
            up_shape = (out_features, rank) + ((1, 1) if weight.ndim == 4 else ())
            # var(up @ down) = rank * var(up) * var(down) = strength**2 / fan_in / factor**2
            down = rng.standard_normal(down_shape, dtype=np.float32) / np.float32(fan_in ** 0.5)
            up = rng.standard_normal(up_shape, dtype=np.float32) * np.float32(strength / factor / rank ** 0.5)
            spec[part][name] = Pair(torch.from_numpy(down), torch.from_numpy(up), a)
    return spec


# ------------------------------------------------------------------------------ the definition


@torch.no_grad()
def apply_by_hand(model: torch.nn.Module, pairs: dict[str, Pair], scale: float = 1.0,
                  in_place: bool = False) -> torch.nn.Module:
    """A copy of ``model`` (``model`` itself with ``in_place``) with
    ``W + scale * alpha / rank * up @ down`` in every module of ``pairs``: the definition,
    without any LoRA loader."""
    if not in_place:
        model = copy.deepcopy(model)
    for name, pair in pairs.items():
        weight = module(model, name).weight
        assert pair.delta().shape == weight.shape, (name, pair.delta().shape, weight.shape)
        weight.copy_((weight.double() + pair.delta(scale)).to(weight.dtype))
    return model


# --------------------------------------------------------------------------------- sgm names


def sgm_unet_names(config) -> dict[str, str]:
    """diffusers UNet module prefix -> sgm (original SDXL) prefix, for the modules LoRAs target.
    ``config``: the diffusers UNet's config (``layers_per_block``, the block types)."""
    lpb = config.layers_per_block
    down_types, up_types = config.down_block_types, config.up_block_types
    names = {
        "conv_in": "input_blocks.0.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    index = 1
    for i, kind in enumerate(down_types):
        for j in range(lpb):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in kind:
                names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < len(down_types) - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    for i, kind in enumerate(up_types):
        attention = "CrossAttn" in kind
        for j in range(lpb + 1):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attention:
                names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == lpb and i < len(up_types) - 1:
                names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attention else 1}.conv"
            index += 1
    return names


_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}


def sgm_name(name: str, table: dict[str, str]) -> str:
    """A diffusers UNet module name under sgm's names (``sgm_unet_names``)."""
    if name in table:
        return table[name]
    m = re.match(r"(.*\.resnets\.\d+)\.(\w+)$", name)
    if m:
        return f"{table[m[1]]}.{_SGM_RESNET[m[2]]}"
    m = re.match(r"(.*\.attentions\.\d+)\.(.+)$", name)
    if m:  # the transformer's own names are the same in both layouts
        return f"{table[m[1]]}.{m[2]}"
    raise KeyError(name)


# ------------------------------------------------------------------------------------ writers


def _alpha_tensor(alpha: float, index: int) -> torch.Tensor:
    # sd-scripts stores a 0-d tensor; some tools a 1-element one: both, alternately.
    return torch.tensor(alpha, dtype=torch.float32) if index % 3 else torch.tensor([alpha], dtype=torch.float32)


def kohya_state(spec: Spec, names: str = "diffusers", unet_config=None) -> dict[str, torch.Tensor]:
    """kohya / sd-scripts: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha``; ``lora_te1_`` / ``lora_te2_`` for the text encoders (transformers' names).
    ``names``: "diffusers" (diffusers' module paths) or "sgm" (the original SDXL UNet's, as
    sd-scripts writes them for SDXL; needs ``unet_config``)."""
    table = sgm_unet_names(unet_config) if names == "sgm" else None
    state = {}
    for part, pairs in spec.items():
        for i, (name, pair) in enumerate(pairs.items()):
            if part == "unet" and table is not None:
                name = sgm_name(name, table)
            key = KOHYA_PREFIX[part] + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = pair.down.contiguous()
            state[f"{key}.lora_up.weight"] = pair.up.contiguous()
            if pair.alpha is not None:
                state[f"{key}.alpha"] = _alpha_tensor(pair.alpha, i)
    return state


def peft_state(spec: Spec) -> dict[str, torch.Tensor]:
    """diffusers / PEFT: ``<part>.<module>.lora_A.weight`` (down) / ``.lora_B.weight`` (up).
    The alphas are not in the tensors (see ``peft_metadata``)."""
    state = {}
    for part, pairs in spec.items():
        for name, pair in pairs.items():
            state[f"{part}.{name}.lora_A.weight"] = pair.down.contiguous()
            state[f"{part}.{name}.lora_B.weight"] = pair.up.contiguous()
    return state


def _most_common(values: list) -> float:
    unique, counts = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
    value = unique[counts.argmax()]
    return int(value) if float(value).is_integer() else float(value)


def peft_metadata(spec: Spec) -> dict[str, str]:
    """The safetensors header diffusers' ``save_lora_weights`` writes beside PEFT tensors:
    ``lora_adapter_metadata``, JSON of each part's LoraConfig fields under ``<part>.``: ``r``
    and ``lora_alpha`` (the most common rank and alpha), ``rank_pattern`` / ``alpha_pattern``
    for the modules that differ, ``target_modules``. Patterns are matched against module
    names by suffix, so they are written without ``text_model.`` (which transformers 5's
    CLIPTextModel lacks) and match either way."""
    fields = {}
    for part, pairs in spec.items():
        if not pairs:
            continue
        short = {name: name.removeprefix(TEXT_MODEL) for name in pairs}
        ranks = {short[n]: p.rank for n, p in pairs.items()}
        alphas = {short[n]: p.rank if p.alpha is None else p.alpha for n, p in pairs.items()}
        r, lora_alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
        config = {
            "r": r, "lora_alpha": lora_alpha,
            "rank_pattern": {n: v for n, v in ranks.items() if v != r},
            "alpha_pattern": {n: v for n, v in alphas.items() if v != lora_alpha},
            "target_modules": sorted(short.values()),
            "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False,
            "init_lora_weights": True,
        }
        fields.update({f"{part}.{key}": value for key, value in config.items()})
    return {"format": "pt", "lora_adapter_metadata": json.dumps(fields, indent=2, sort_keys=True)}


_PROCESSOR = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
_TEXT_PROCESSOR = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}


def attn_procs_state(spec: Spec) -> dict[str, torch.Tensor]:
    """diffusers' older attention-processor format (LoRAAttnProcessor, diffusers 0.14-0.20):
    ``unet.<block>.attn1.processor.to_q_lora.down.weight`` / ``.up.weight``; text encoders'
    ``...self_attn.to_q_lora.down.weight`` and ``...mlp.fc1.lora_linear_layer.down.weight``
    (the names diffusers' state_dict_utils maps). It had no alphas: every alpha must be None."""
    state = {}
    for part, pairs in spec.items():
        for name, pair in pairs.items():
            assert pair.alpha is None, "the attention-processor format stores no alpha"
            parent, leaf = re.match(r"(.*?)\.((?:to_out\.0)|\w+)$", name).groups()
            if part == "unet":
                key = f"unet.{parent}.processor.{_PROCESSOR[leaf]}"
            elif leaf in _TEXT_PROCESSOR:
                key = f"{part}.{parent}.{_TEXT_PROCESSOR[leaf]}"
            else:
                key = f"{part}.{name}.lora_linear_layer"
            state[f"{key}.down.weight"] = pair.down.contiguous()
            state[f"{key}.up.weight"] = pair.up.contiguous()
    return state


def old_diffusers_state(spec: Spec) -> dict[str, torch.Tensor]:
    """diffusers' format of 0.21-0.24 (LoRACompatibleLinear / Conv, before PEFT):
    ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``, text encoders'
    ``<part>.<module>.lora_linear_layer.down.weight``. No alphas: every alpha must be None."""
    state = {}
    for part, pairs in spec.items():
        for name, pair in pairs.items():
            assert pair.alpha is None, "this format stores no alpha"
            key = f"{part}.{name}." + ("lora" if part == "unet" else "lora_linear_layer")
            state[f"{key}.down.weight"] = pair.down.contiguous()
            state[f"{key}.up.weight"] = pair.up.contiguous()
    return state


def write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(state, str(path), metadata=metadata)
    return path
