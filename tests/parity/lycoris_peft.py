"""peft's own LoHa and LoKr layers built around a LyCORIS file's tensors: the independent
implementation that confirms ``lycoris_files.module_delta`` (the definition)."""

from __future__ import annotations

import copy
import math
import re
from typing import Mapping

import torch
from lycoris_files import factorization, group_modules, kohya_modules, part_of

# ---------------------------------------------------------------------- peft's implementation


class _Holder(torch.nn.Module):
    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.m = module


def _lokr_peft_rank(tensors: Mapping[str, torch.Tensor], weight: torch.Tensor) -> tuple[int, bool, bool]:
    """(r, decompose_both, natural): the rank peft needs to build this module's forms, and whether
    its rules build exactly them (LyCORIS's balanced factorization and r's thresholds)."""
    out, inp = weight.shape[:2]
    (a, b), (c, d) = factorization(out), factorization(inp)
    decompose_both = "lokr_w1_a" in tensors
    if "lokr_w2_b" in tensors:
        r = tensors["lokr_w2_b"].shape[0]
    elif decompose_both:
        r = tensors["lokr_w1_b"].shape[0]
    else:
        r = math.ceil(max(b, d) / 2)  # peft builds a full w2 for r >= max(b, d) / 2
    if "lokr_w1" in tensors:
        w1_shape = tuple(tensors["lokr_w1"].shape)
    else:
        w1_shape = (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])
    natural = tuple(w1_shape) == (a, c)
    natural &= decompose_both == (r < max(a, c) / 2)
    natural &= ("lokr_w2" in tensors) == (r >= max(b, d) / 2)
    return r, decompose_both, natural


@torch.no_grad()
def peft_delta(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """peft's delta (float64) for ``module`` (a torch Linear or Conv2d) holding ``tensors``, and
    whether peft's own config built parameters of exactly the file's shapes (else they are set in
    its parameter dicts by hand: peft's rules cannot make that combination of forms).

    peft scales by its config's alpha / r: r is the file's rank, alpha the file's, except where
    the file has no decomposed factor (LoKr full w1 and w2) or no alpha, whose scale is 1."""
    import peft

    holder = _Holder(copy.deepcopy(module).double())
    file_names = {n for n in tensors if n != "alpha"}
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    if "hada_w1_a" in tensors:
        r = tensors["hada_w1_b"].shape[0]
        config = peft.LoHaConfig(r=r, alpha=r if alpha is None else alpha, target_modules=["m"],
                                 use_effective_conv2d="hada_t1" in tensors, init_weights=False)
        natural = True
    else:
        r, decompose_both, natural = _lokr_peft_rank(tensors, module.weight)
        decomposed = "lokr_w1_a" in tensors or "lokr_w2_a" in tensors
        config = peft.LoKrConfig(r=r, alpha=alpha if (alpha is not None and decomposed) else r,
                                 target_modules=["m"], use_effective_conv2d="lokr_t2" in tensors,
                                 decompose_both=decompose_both, init_weights=False)
    peft.inject_adapter_in_model(config, holder)
    layer = holder.m
    built = {n for n in layer.adapter_layer_names if "default" in getattr(layer, n)}
    shapes_match = built == file_names and all(
        tuple(getattr(layer, n)["default"].shape) == tuple(tensors[n].shape) for n in file_names)
    assert shapes_match or not natural, (
        "peft's rules build other shapes than the file's: "
        f"{ {n: tuple(getattr(layer, n)['default'].shape) for n in built} } vs "
        f"{ {n: tuple(tensors[n].shape) for n in file_names} }")
    for n in built:
        getattr(layer, n).pop("default")
    for n in file_names:
        getattr(layer, n)["default"] = torch.nn.Parameter(tensors[n].double(), requires_grad=False)
    return layer.get_delta_weight("default").double(), shapes_match


@torch.no_grad()
def peft_model(model: torch.nn.Module, state: Mapping[str, torch.Tensor], part: str) -> torch.nn.Module:
    """A float64 copy of ``model`` with peft's LoHa adapters injected for one whole LoHa file
    without Tucker cores (one config: per-module rank and alpha through rank_pattern and
    alpha_pattern), the file's tensors copied into them: peft's forward adds its delta's output
    to the base layer's (unmerged), a second computation of what the file does."""
    import peft

    model = copy.deepcopy(model).double()
    modules = kohya_modules(model, part)
    paths = {id(m): p for p, m in model.named_modules()}
    grouped = {name: t for name, t in group_modules(state).items() if part_of(name) == part}
    assert all("hada_w1_a" in t and "hada_t1" not in t for t in grouped.values()), "plain LoHa only"
    targets = {paths[id(modules[name])]: t for name, t in grouped.items()}
    pattern = {re.escape(p): t["hada_w1_b"].shape[0] for p, t in targets.items()}
    alphas = {re.escape(p): float(t["alpha"]) if "alpha" in t else pattern[re.escape(p)] for p, t in targets.items()}
    # target_modules as a string: a regex matched against whole module names.
    config = peft.LoHaConfig(r=1, alpha=1, target_modules="|".join(re.escape(p) for p in targets),
                             rank_pattern=pattern, alpha_pattern=alphas, init_weights=False)
    peft.inject_adapter_in_model(config, model)
    injected = dict(model.named_modules())
    for path, tensors in targets.items():
        layer = injected[path]
        for n, x in tensors.items():
            if n != "alpha":
                getattr(layer, n)["default"].copy_(x.double())
    assert sum(hasattr(m, "hada_w1_a") for m in model.modules()) == len(targets)
    return model.eval()
