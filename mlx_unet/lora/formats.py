"""A LoRA file's tensors -> one adapter per module, whatever format wrote them.

Every key is ``<module><suffix>``; the suffix says which factor it is, and so the format:

- kohya / sd-scripts and LyCORIS' LoCon: ``.lora_down.weight``, ``.lora_up.weight``, optional
  ``.lora_mid.weight`` (Tucker core), ``.alpha``;
- diffusers / PEFT: ``.lora_A.weight``, ``.lora_B.weight`` (alphas in ``.alpha`` keys or in
  diffusers' ``lora_adapter_metadata`` header entry, PEFT's LoraConfig as JSON);
- diffusers' older files: ``_lora.down.weight`` (attention processors), ``.lora.down.weight``,
  ``.lora_linear_layer.down.weight``;
- LyCORIS LoHa (``.hada_w1_a`` ...) and LoKr (``.lokr_w1`` ...), with ``.alpha``.

What each module's scale is follows the tools that read these files (sd-scripts, A1111, ComfyUI,
diffusers / PEFT): alpha / rank, 1 without an alpha; PEFT's metadata may give alphas by pattern
and rank-stabilised (``use_rslora``: alpha / sqrt(rank)); a LoKr's rank is its decomposed
factor's, and with no factor decomposed the scale is 1 whatever alpha says.

Adapters of other kinds are refused by name (DoRA, GLoRA, OFT, full ``.diff`` weights...), and an
unknown suffix too: nothing in a file is silently left out.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import mlx.core as mx

from ..errors import WeightsError
from ..naming.lora import PARTS, UNET, part_of
from .adapters import Adapter, Hadamard, Kronecker, LowRank

KOHYA, PEFT, PROCESSOR, OLD_DIFFUSERS, LOHA, LOKR = (
    "kohya LoRA", "diffusers/PEFT LoRA", "diffusers attention-processor LoRA", "diffusers LoRA (older format)",
    "LyCORIS LoHa", "LyCORIS LoKr")

# suffix -> (factor, format). Matched by the longest suffix that fits.
_FACTORS: dict[str, tuple[str, str]] = {
    ".lora_down.weight": ("down", KOHYA), ".lora_up.weight": ("up", KOHYA), ".lora_mid.weight": ("mid", KOHYA),
    ".lora_A.weight": ("down", PEFT), ".lora_B.weight": ("up", PEFT),
    "_lora.down.weight": ("down", PROCESSOR), "_lora.up.weight": ("up", PROCESSOR),
    ".lora.down.weight": ("down", OLD_DIFFUSERS), ".lora.up.weight": ("up", OLD_DIFFUSERS),
    ".lora_linear_layer.down.weight": ("down", OLD_DIFFUSERS), ".lora_linear_layer.up.weight": ("up", OLD_DIFFUSERS),
    **{f".hada_{f}": (f"hada_{f}", LOHA) for f in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{f}": (f"lokr_{f}", LOKR) for f in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    ".alpha": ("alpha", ""),
}
# Suffixes of adapters we do not apply -> what they are.
_REFUSED = {
    ".dora_scale": "DoRA (dora_scale)", ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    ".a1.weight": "GLoRA", ".a2.weight": "GLoRA", ".b1.weight": "GLoRA", ".b2.weight": "GLoRA",
    ".diff": "full weight differences (.diff)", ".diff_b": "full bias differences (.diff_b)",
    ".w_norm": "normalisation-layer weights (.w_norm)", ".b_norm": "normalisation-layer biases (.b_norm)",
    ".oft_blocks": "OFT", ".oft_diag": "OFT", ".oft_R.weight": "BOFT", ".on_input": "IA3",
    ".lora_B.bias": "LoRA biases (PEFT's lora_bias)", ".lora_up.bias": "LoRA biases",
}
_SUFFIX = re.compile("|".join(re.escape(s) for s in sorted({*_FACTORS, *_REFUSED}, key=len, reverse=True)) + "$")
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry holding PEFT's LoraConfig per part


@dataclass
class LoRAFile:
    """A LoRA file read and grouped: ``modules[part][file module name]`` is the adapter for one
    layer (parts: unet, text_encoder, text_encoder_2); ``format`` names what wrote it."""

    name: str
    format: str
    modules: dict[str, dict[str, Adapter]] = field(default_factory=dict)

    @property
    def parts(self) -> dict[str, int]:
        return {part: len(modules) for part, modules in self.modules.items() if modules}

    def describe(self) -> str:
        counts = ", ".join(f"{part} {n}" for part, n in self.parts.items())
        return f"{self.name}: {self.format}, {sum(self.parts.values())} modules ({counts})"


def _refuse(file: str, problem: str) -> WeightsError:
    return WeightsError(f"{file} {problem}.")


def _alpha(value: mx.array, key: str, file: str) -> float:
    if value.size != 1:
        raise _refuse(file, f"gives {key} as {tuple(value.shape)} values, where an alpha is one number")
    alpha = value.astype(mx.float32).item()
    if not math.isfinite(alpha):
        raise _refuse(file, f"has a non-finite alpha in {key}; download it again")
    return alpha


def _peft_config(metadata: dict[str, str], file: str) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata``: PEFT's LoraConfig of each part, by part."""
    raw = metadata.get(_METADATA_KEY)
    if raw is None:
        return {}
    try:
        flat = json.loads(raw)
    except (ValueError, RecursionError):
        raise _refuse(file, f"has a {_METADATA_KEY} header entry that is not valid JSON") from None
    if not isinstance(flat, dict):
        raise _refuse(file, f"has a {_METADATA_KEY} header entry that is not a JSON object")
    configs: dict[str, dict] = defaultdict(dict)
    for key, value in flat.items():
        part, _, name = str(key).partition(".")
        configs[part][name] = value
    for part, config in configs.items():
        for flag, what in (("use_dora", "DoRA (use_dora)"), ("lora_bias", "LoRA biases (lora_bias)")):
            if config.get(flag):
                raise _refuse(file, f"is a {what} adapter for the {part}; mlx-unet applies LoRA, LoCon, LoHa and "
                                    "LoKr only")
    return configs


def _pattern(patterns: dict, path: str):
    """PEFT's rank/alpha pattern lookup: a pattern matches a module path's dotted tail."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def _peft_scale(config: dict, part: str, module: str, rank: int) -> float | None:
    """The scale PEFT's LoraConfig gives ``module`` (None without a config for its part)."""
    if not config:
        return None
    path = module.removeprefix(part + ".")
    alpha = _pattern(config.get("alpha_pattern") or {}, path)
    alpha = config.get("lora_alpha", rank) if alpha is None else alpha
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _low_rank(factors: dict, alpha: float | None, peft_scale: float | None) -> LowRank:
    rank = factors["down"].shape[0]
    scale = alpha / rank if alpha is not None else (peft_scale if peft_scale is not None else 1.0)
    return LowRank(factors["down"], factors["up"], scale, factors.get("mid"))


def _loha(f: dict, alpha: float | None) -> Hadamard:
    rank = f["hada_w1_b"].shape[0]
    return Hadamard(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"],
                    1.0 if alpha is None else alpha / rank, f.get("hada_t1"), f.get("hada_t2"))


def _lokr(f: dict, alpha: float | None) -> Kronecker:
    w1 = f["lokr_w1"] if "lokr_w1" in f else (f["lokr_w1_a"], f["lokr_w1_b"])
    w2 = f["lokr_w2"] if "lokr_w2" in f else (f["lokr_w2_a"], f["lokr_w2_b"])
    # A1111's and ComfyUI's rule: the rank is the decomposed factor's, w2's before w1's.
    rank = f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else None
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return Kronecker(w1, w2, scale, f.get("lokr_t2"))


# What each kind needs, and how it is made.
_KINDS = (
    ({"down", "up"}, {"mid"}, lambda f, a, p: _low_rank(f, a, p)),
    ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2"}, lambda f, a, p: _loha(f, a)),
)


def _adapter(module: str, factors: dict, file: str, peft_scale: float | None) -> Adapter:
    alpha = factors.pop("alpha", None)
    names = set(factors)
    if not names:
        raise _refuse(file, f"gives an alpha for {module} but no weights for it")
    for needed, optional, make in _KINDS:
        if names & (needed | optional):
            if not needed <= names or not names <= needed | optional:
                raise _refuse(file, f"has {', '.join(sorted(names))} for {module}, not a whole adapter "
                                    f"({', '.join(sorted(needed))} are needed)")
            return make(factors, alpha, peft_scale(factors["down"].shape[0]) if "down" in factors else None)
    has_w1 = "lokr_w1" in names or {"lokr_w1_a", "lokr_w1_b"} <= names
    has_w2 = "lokr_w2" in names or {"lokr_w2_a", "lokr_w2_b"} <= names
    if not (has_w1 and has_w2) or ("lokr_t2" in names and "lokr_w2" in names):
        raise _refuse(file, f"has {', '.join(sorted(names))} for {module}, not a whole LoKr adapter")
    return _lokr(factors, alpha)


def parse(name: str, tensors: dict[str, mx.array], metadata: dict[str, str]) -> LoRAFile:
    """Group ``tensors`` (the file's, by key) into one adapter per module, each under its part."""
    grouped: dict[str, dict[str, mx.array]] = defaultdict(dict)
    formats: set[str] = set()
    for key, value in tensors.items():
        found = _SUFFIX.search(key)
        if key.startswith(("bundle_emb.", "emb_params")):
            raise _refuse(name, f"bundles textual-inversion embeddings ({key}), which mlx-unet does not load; "
                                "use a LoRA without them")
        if found is None or found.start() == 0:
            raise _refuse(name, f"holds {key!r}, which is no LoRA, LoCon, LoHa or LoKr tensor; only those "
                                "adapters can be applied")
        suffix = found.group()
        if suffix in _REFUSED:
            raise _refuse(name, f"is a {_REFUSED[suffix]} adapter ({key}); mlx-unet applies LoRA, LoCon, LoHa and "
                                "LoKr only")
        factor, kind = _FACTORS[suffix]
        if kind:
            formats.add(kind)
        module = key[:found.start()]
        if factor == "alpha":
            grouped[module]["alpha"] = _alpha(value, key, name)
        else:
            grouped[module][factor] = value
    if not grouped:
        raise _refuse(name, "holds no tensors; it is not a LoRA")
    configs = _peft_config(metadata, name)
    lora = LoRAFile(name, _format_name(formats, grouped))
    for module, factors in grouped.items():
        part = part_of(module) or UNET
        config = configs.get(part, {})
        adapter = _adapter(module, factors, name, lambda rank: _peft_scale(config, part, module, rank))
        lora.modules.setdefault(part, {})[module] = adapter
    lora.modules = {part: lora.modules[part] for part in PARTS if part in lora.modules}
    return lora


def _format_name(formats: set[str], grouped: dict) -> str:
    if KOHYA in formats:
        sgm = any(re.search(r"_(input_blocks|middle_block|output_blocks)_", m) for m in grouped)
        convs = any(f.get("down") is not None and f["down"].ndim == 4 and math.prod(f["down"].shape[2:]) > 1
                    for f in grouped.values())
        details = [d for d, present in (("sgm names", sgm), ("LoCon convolutions", convs)) if present]
        formats = (formats - {KOHYA}) | {KOHYA + (f" ({', '.join(details)})" if details else "")}
    if PROCESSOR in formats:
        formats.discard(OLD_DIFFUSERS)  # such files name text-encoder MLPs the older way
    return " + ".join(sorted(formats))
