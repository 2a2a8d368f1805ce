"""Random LyCORIS LoHa and LoKr files for the tiny models, and what they must do to them.

Files as model sites hold them: kohya module names (``lora_unet_`` + the diffusers module path
with ``.`` -> ``_``; ``lora_te1_`` / ``lora_te2_`` + the transformers 4 path, which starts with
``text_model.`` for both encoders), and per module:

- LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1``, ``hada_t2``, the
  Tucker cores of a k x k convolution), ``alpha``:
  delta = (w1a @ w1b) * (w2a @ w2b) * alpha / rank, rank = hada_w1_b.shape[0], a convolution's
  w1b (rank, in * kh * kw) and the product reshaped to (out, in, kh, kw); with Tucker cores
  W1 = einsum('i j k l, j r, i p -> p r k l', t1, w1b, w1a), w1a (rank, out), w1b (rank, in).
- LoKr: ``lokr_w1`` or ``lokr_w1_a`` @ ``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a`` @ ``lokr_w2_b``
  or, for a k x k convolution, einsum('i j k l, i p, j r -> p r k l', lokr_t2, w2_a, w2_b); ``alpha``:
  delta = kron(w1, w2) (w1 as (a, c, 1, 1) beside a 4-D w2), reshaped to the weight's shape, times
  alpha / dim, dim = lokr_w2_b.shape[0], else lokr_w1_b.shape[0]; 1 when neither factor is
  decomposed, whatever alpha says (A1111's and ComfyUI's loaders; LyCORIS stores alpha = dim then).
- No ``alpha``: scale 1 (A1111, ComfyUI; LyCORIS reads a missing alpha as alpha = rank).

The UNet's modules are named by diffusers' paths (CASES) and, as kohya's sd-scripts name an SDXL
UNet's, by sgm's (SGM_CASES).

Factor shapes follow LyCORIS's rules (``factorization`` of out and in, which peft copies), so that
peft's LoHa / LoKr layers, built from a config, hold tensors of the file's shapes: ``peft_delta``
copies the file's tensors into them and asks peft for the delta, an implementation independent
of ``module_delta``'s.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


# ---------------------------------------------------------------------- what a file holds


@dataclass(frozen=True)
class Target:
    """One adapted module. ``path``: the diffusers path for the UNet, the transformers 4 path
    (``text_model.`` first) for the encoders. ``w1`` / ``w2`` (LoKr): "full", "lowrank", "tucker".
    ``out_factors``: LoKr's (a, b) split of out (LyCORIS's unbalanced_factorization swaps it)."""

    part: str
    path: str
    rank: int = 4
    alpha: float | None = 2.0
    tucker: bool = False  # LoHa: hada_t1 / hada_t2
    w1: str = "full"
    w2: str = "lowrank"
    out_factors: tuple[int, int] | None = None
    sgm: bool = False  # named by sgm's layout (SGM_NAMES), as kohya's sd-scripts name SDXL modules

    @property
    def kohya_name(self) -> str:
        return PREFIXES[self.part] + (SGM_NAMES[self.path] if self.sgm else self.path).replace(".", "_")


@dataclass(frozen=True)
class Case:
    algo: str  # "loha" | "lokr"
    targets: tuple[Target, ...]
    dtype: torch.dtype = torch.float32  # as stored in the file
    seed: int = 0

    @property
    def format(self) -> str:
        return {"loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr"}[self.algo]

    def parts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.targets:
            counts[t.part] = counts.get(t.part, 0) + 1
        return counts


def _block(prefix: str, *names: str) -> list[str]:
    return [f"{prefix}.{name}" for name in names]


_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
         "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2")
_TB = "down_blocks.1.attentions.0.transformer_blocks.0"  # widths 64, cross-attention 48, ff 256
_CLIP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _te(part: str, layers: tuple[int, ...], **kw) -> list[Target]:
    return [Target(part, f"text_model.encoder.layers.{i}.{name}", **kw) for i in layers for name in _CLIP]


# Linear: attention (self and cross: to_k / to_v are 64 x 48), feed-forward (512 x 64, 64 x 256),
# proj_in / proj_out, a resnet's time_emb_proj (64 x 128). Convolutions: resnet conv1 (64 <- 32)
# and conv2 (64 <- 64), 3 x 3; conv_shortcut 1 x 1; a downsampler and an upsampler; an up block
# resnet whose input is a skip concatenation (32 <- 96).
_UNET_LINEAR = [
    "down_blocks.1.attentions.0.proj_in", *_block(_TB, *_ATTN, *_FF), "down_blocks.1.attentions.0.proj_out",
    "down_blocks.1.resnets.0.time_emb_proj",
    *_block("mid_block.attentions.0.transformer_blocks.1", "attn1.to_v", "attn2.to_k", "ff.net.2"),
]
_UNET_CONV3 = [
    "down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv2", "down_blocks.0.downsamplers.0.conv",
    "up_blocks.1.upsamplers.0.conv", "up_blocks.2.resnets.0.conv1",
]
_UNET_CONV1 = ["down_blocks.1.resnets.0.conv_shortcut", "up_blocks.2.resnets.0.conv_shortcut"]


def _unet(paths, **kw) -> list[Target]:
    return [Target("unet", p, **kw) for p in paths]


CASES: dict[str, Case] = {
    # Plain LoHa everywhere, both text encoders; ranks 4 and 8, alpha != rank.
    "loha": Case("loha", tuple(
        _unet(_UNET_LINEAR[:7], rank=4, alpha=2.0) + _unet(_UNET_LINEAR[7:], rank=8, alpha=12.0)
        + _unet(_UNET_CONV3 + _UNET_CONV1, rank=4, alpha=1.0)
        + _te("text_encoder", (0, 2), rank=4, alpha=2.0) + _te("text_encoder_2", (1, 3), rank=4, alpha=6.0)
    ), seed=1),
    # Tucker cores on the k x k convolutions (LyCORIS never puts them on 1 x 1 ones).
    "loha_tucker": Case("loha", tuple(
        _unet(_UNET_CONV3, rank=4, alpha=3.0, tucker=True) + _unet(_UNET_CONV1, rank=4, alpha=3.0)
        + _unet(_UNET_LINEAR[:3], rank=4, alpha=3.0)
    ), seed=2),
    # LyCORIS at linear_dim = conv_dim = 4: full w1 everywhere, w2 full where 4 >= max(b, d) / 2
    # (then the scale is 1, whatever alpha says: stored 2 here), low rank elsewhere (scale 2 / 4).
    # Stored in float16, as most downloaded files are.
    "lokr": Case("lokr", tuple(
        [Target("unet", p, rank=4, alpha=2.0, w2="full") for p in _UNET_LINEAR[:9]]  # 64 x 64, 64 x 48
        + _unet(_block(_TB, *_FF) + ["down_blocks.1.resnets.0.time_emb_proj"], rank=4, alpha=2.0)
        + [Target("unet", p, rank=4, alpha=2.0, w2="full") for p in _UNET_CONV3[:4] + _UNET_CONV1[:1]]
        + _unet(["up_blocks.2.resnets.0.conv1", "up_blocks.2.resnets.0.conv_shortcut"], rank=4, alpha=2.0)
        + [Target("text_encoder", p.path, rank=4, alpha=2.0, w2="full" if "self_attn" in p.path else "lowrank")
           for p in _te("text_encoder", (1,))]
        + [Target("text_encoder_2", p.path, rank=4, alpha=2.0, w2="full" if "self_attn" in p.path else "lowrank")
           for p in _te("text_encoder_2", (0, 3))]
    ), dtype=torch.float16, seed=3),
    # Tucker w2 on the k x k convolutions, low-rank w2 elsewhere; rank 2, alpha 3.
    "lokr_tucker": Case("lokr", tuple(
        _unet(_UNET_CONV3, rank=2, alpha=3.0, w2="tucker") + _unet(_UNET_CONV1, rank=2, alpha=3.0)
        + _unet(_UNET_LINEAR[:2] + _UNET_LINEAR[9:11], rank=2, alpha=3.0)
    ), seed=4),
    # decompose_both: w1 and w2 both low rank; and one module with w1 low rank beside a full w2
    # (LyCORIS's unbalanced_factorization: out = 32 x 16), whose scale is alpha / w1_b's rank.
    "lokr_both": Case("lokr", tuple(
        _unet(_UNET_LINEAR[:9] + _UNET_CONV3[:2] + _UNET_CONV3[4:], rank=2, alpha=1.5, w1="lowrank")
        + [Target("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", rank=8, alpha=6.0,
                  w1="lowrank", w2="full", out_factors=(32, 16))]
    ), seed=5),
}

# No alpha key: the scale is 1.
NO_ALPHA = {
    "loha_no_alpha": Case("loha", tuple(_unet(_UNET_LINEAR[:4] + _UNET_CONV3[:2], rank=4, alpha=None)), seed=6),
    "lokr_no_alpha": Case("lokr", tuple(_unet(_UNET_LINEAR[9:11] + _UNET_CONV3[:2], rank=2, alpha=None)), seed=7),
}


# kohya's sd-scripts name an SDXL UNet's modules by Stability's sgm layout (input_blocks.N.M,
# middle_block.N, output_blocks.N.M; resnets' in_layers.2 / out_layers.3 / emb_layers.1 /
# skip_connection, downsamplers' op): lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.
# Written out by hand for the tiny sdxl-base config (3 levels of 2 resnets; input_blocks.0 is
# conv_in, 3 and 6 the downsamplers; an up level has 3 output blocks, its upsampler in the last).
SGM_NAMES = {
    "down_blocks.1.attentions.0.proj_in": "input_blocks.4.1.proj_in",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0":
        "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj":
        "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.4.0.emb_layers.1",
    "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
    "down_blocks.1.resnets.0.conv2": "input_blocks.4.0.out_layers.3",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "mid_block.attentions.0.transformer_blocks.1.ff.net.2": "middle_block.1.transformer_blocks.1.ff.net.2",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.0.conv1": "output_blocks.6.0.in_layers.2",
    "up_blocks.2.resnets.0.conv_shortcut": "output_blocks.6.0.skip_connection",
    "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_k": "output_blocks.2.1.transformer_blocks.1.attn2.to_k",
}
_SGM_LINEAR = [p for p in SGM_NAMES if ".resnets." not in p or p.endswith("time_emb_proj")]
_SGM_LINEAR = [p for p in _SGM_LINEAR if not p.endswith((".conv", ".op"))]
_SGM_CONV3 = ["down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv2", "down_blocks.0.downsamplers.0.conv",
              "up_blocks.1.upsamplers.0.conv", "up_blocks.2.resnets.0.conv1"]
_SGM_CONV1 = ["down_blocks.1.resnets.0.conv_shortcut", "up_blocks.2.resnets.0.conv_shortcut"]

# The same kinds of file under sgm's names (and text encoder modules as in every SDXL file).
SGM_CASES = {
    "loha_sgm": Case("loha", tuple(
        _unet(_SGM_LINEAR + _SGM_CONV1, rank=4, alpha=2.0, sgm=True)
        + _unet(_SGM_CONV3, rank=4, alpha=2.0, tucker=True, sgm=True)
        + _te("text_encoder", (0,), rank=4, alpha=2.0)
    ), seed=8),
    "lokr_sgm": Case("lokr", tuple(
        _unet(_SGM_LINEAR + _SGM_CONV1, rank=2, alpha=3.0, sgm=True)
        + _unet(_SGM_CONV3, rank=2, alpha=3.0, w2="tucker", sgm=True)
        + _te("text_encoder_2", (1,), rank=2, alpha=3.0)
    ), seed=9),
}


# ---------------------------------------------------------------------- models' modules by file name


def kohya_modules(model: torch.nn.Module, part: str) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d of a diffusers UNet or transformers CLIP text model, under its
    kohya name. transformers 5's CLIPTextModel has no ``text_model`` level (files name it anyway)."""
    names = {}
    bare = part != "unet" and not hasattr(model, "text_model")
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            if bare:
                path = "text_model." + path
            names[PREFIXES[part] + path.replace(".", "_")] = module
            if part == "unet" and path in SGM_NAMES:
                names[PREFIXES[part] + SGM_NAMES[path].replace(".", "_")] = module
    return names


def group_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya module name: {"hada_w1_a": tensor, ..., "alpha": tensor}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, name = key.rsplit(".", 1)
        modules.setdefault(module, {})[name] = tensor
    return modules


def part_of(kohya_name: str) -> str:
    return next(part for part, prefix in PREFIXES.items() if kohya_name.startswith(prefix))


# ---------------------------------------------------------------------- random files


def factorization(dimension: int) -> tuple[int, int]:
    """LyCORIS's split (factor -1): the divisor pair m <= n of ``dimension`` closest to its root."""
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def _draw(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Standard normal, kept away from 0 (every entry matters)."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 0.05, np.sign(x + 1e-12) * 0.05, x)


def _factors(target: Target, algo: str, shape: tuple[int, ...], rng) -> dict[str, np.ndarray]:
    out, inp, *k = shape
    kk, r = math.prod(k), target.rank
    if algo == "loha":
        if target.tucker:
            assert kk > 1, target
            return {"hada_w1_a": _draw(rng, r, out), "hada_w1_b": _draw(rng, r, inp), "hada_t1": _draw(rng, r, r, *k),
                    "hada_w2_a": _draw(rng, r, out), "hada_w2_b": _draw(rng, r, inp), "hada_t2": _draw(rng, r, r, *k)}
        return {"hada_w1_a": _draw(rng, out, r), "hada_w1_b": _draw(rng, r, inp * kk),
                "hada_w2_a": _draw(rng, out, r), "hada_w2_b": _draw(rng, r, inp * kk)}
    a, b = target.out_factors or factorization(out)
    c, d = factorization(inp)
    tensors = {}
    if target.w1 == "full":
        tensors["lokr_w1"] = _draw(rng, a, c)
    else:
        tensors["lokr_w1_a"], tensors["lokr_w1_b"] = _draw(rng, a, r), _draw(rng, r, c)
    if target.w2 == "full":
        tensors["lokr_w2"] = _draw(rng, b, d, *k)
    elif target.w2 == "tucker":
        assert kk > 1, target
        tensors["lokr_t2"] = _draw(rng, r, r, *k)
        tensors["lokr_w2_a"], tensors["lokr_w2_b"] = _draw(rng, r, b), _draw(rng, r, d)
    else:
        tensors["lokr_w2_a"], tensors["lokr_w2_b"] = _draw(rng, b, r), _draw(rng, r, d * kk)
    return tensors


# The adapted module's delta is drawn at this fraction of its weight's root mean square: enough
# to move every output by far more than the comparisons' bounds, little enough to stay in range.
DELTA_RATIO = 0.3


def make_tensors(case: Case, models: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The file's tensors for ``models`` ({part: torch model}), in ``case.dtype``."""
    rng = np.random.default_rng(case.seed)
    modules = {part: kohya_modules(model, part) for part, model in models.items()}
    state = {}
    for target in case.targets:
        weight = modules[target.part][target.kohya_name].weight.detach()
        drawn = _factors(target, case.algo, tuple(weight.shape), rng)
        tensors = {name: torch.from_numpy(x) for name, x in drawn.items()}
        if target.alpha is not None:
            tensors["alpha"] = torch.tensor(float(target.alpha), dtype=torch.float64)
        # Scale the first factor (the delta is linear in it) so that the delta has the wanted size.
        delta = module_delta(tensors, tuple(weight.shape))
        first = "hada_w1_a" if case.algo == "loha" else ("lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a")
        tensors[first] *= DELTA_RATIO * float(weight.double().pow(2).mean().sqrt() / delta.pow(2).mean().sqrt())
        for name, tensor in tensors.items():
            state[f"{target.kohya_name}.{name}"] = tensor.to(case.dtype).contiguous()
    return state


def write_case(case: Case, path: Path, models: Mapping[str, torch.nn.Module]) -> Path:
    save_file(make_tensors(case, models), str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path


def read(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as stored (the reference works from exactly these values)."""
    return load_file(str(path))


# ---------------------------------------------------------------------- the definition


def module_delta(tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """alpha / rank * delta of one module, float64, in the PyTorch weight's ``shape``."""
    t = {name: x.double() for name, x in tensors.items()}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            w1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        scale = 1.0 if alpha is None else alpha / rank
        return (w1 * w2).reshape(shape) * scale
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        dim = t["lokr_w2_b"].shape[0]
        if "lokr_t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = 1.0 if alpha is None or dim is None else alpha / dim
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape) * scale


@torch.no_grad()
def apply_reference(model: torch.nn.Module, state: Mapping[str, torch.Tensor], part: str,
                    multiplier: float = 1.0) -> torch.nn.Module:
    """A float64 copy of ``model`` with W += multiplier * delta for each of ``part``'s modules
    in the file (all must be found)."""
    model = copy.deepcopy(model).double()
    modules = kohya_modules(model, part)
    found = 0
    for name, tensors in group_modules(state).items():
        if part_of(name) != part:
            continue
        weight = modules[name].weight
        weight += multiplier * module_delta(tensors, tuple(weight.shape))
        found += 1
    assert found, f"no {part} module in the file"
    return model.eval()
