"""LyCORIS LoHa and LoKr files (lycoris_files) applied to our UNet and text encoders, against
the files' definitions applied to diffusers' UNet and transformers' encoders in float64, the
definitions themselves checked against peft's LoHa and LoKr layers.

Every module of every file matters: leaving any single one out moves the reference output it
touches by 9e-3 (relative) or more, 90 times FP32_BOUND (measured once; 3 minutes, not run here),
so a module skipped, misnamed or misscaled by our loader cannot pass unseen."""

from __future__ import annotations

import copy
import warnings

import mlx.core as mx
import numpy as np
import pytest
from axes import CODE_PATHS, each_value_once
from lycoris_files import (
    CASES,
    NO_ALPHA,
    SGM_CASES,
    apply_reference,
    group_modules,
    kohya_modules,
    module_delta,
    part_of,
    read,
    write_case,
)
from lycoris_peft import peft_delta, peft_model
from mlx.utils import tree_flatten
from reference import (
    make_inputs,
    mlx_from_torch,
    relative_error,
    run_mlx,
    run_torch,
    tiny_config,
    torch_unet,
)
from reference_text import mlx_text_encoder, token_ids, torch_text_encoder
from reference_text import run_torch as run_torch_text

from mlx_unet import CLIPTextConfig, MlxUnetWarning, lora

FP32_BOUND = 1e-4
FP16_BOUND = 1e-2  # our float16 model against the float64 reference
PEFT_BOUND = 1e-12  # peft's delta against the definition's, both in float64
VISIBLE = 1e-2  # every file moves every output it touches by more than this (relative)
SCALES = (1.0, 0.6)
ENCODERS = {"text_encoder": "tiny-clip-l", "text_encoder_2": "tiny-clip-bigg"}  # without / with projection
HIDDEN_LAYER = -1  # the last layer's output: every adapted layer acts on it
ALL = {**CASES, **NO_ALPHA, **SGM_CASES}


class World:
    """The torch models, the files written for them, and the reference outputs (cached)."""

    def __init__(self, folder):
        self.config = tiny_config("sdxl-base")
        self.unet = torch_unet(self.config, seed=11)
        self.encoder_configs = {part: CLIPTextConfig.from_preset(p) for part, p in ENCODERS.items()}
        self.encoders = {part: torch_text_encoder(c, seed=12 + i)
                         for i, (part, c) in enumerate(self.encoder_configs.items())}
        self.models = {"unet": self.unet, **self.encoders}
        self.paths = {name: write_case(case, folder / f"{name}.safetensors", self.models)
                      for name, case in ALL.items()}
        self.inputs = make_inputs(self.config, 2, 16, 16, seed=3)
        self.ids = {part: token_ids(c, 3, 16, seed=4) for part, c in self.encoder_configs.items()}
        self._cache = {}

    def state(self, case: str):
        return read(self.paths[case])

    def unet_reference(self, case: str | None, multiplier: float = 1.0) -> np.ndarray:
        key = ("unet", case, multiplier)
        if key not in self._cache:
            model = copy.deepcopy(self.unet).double() if case is None else apply_reference(
                self.unet, self.state(case), "unet", multiplier)
            self._cache[key] = run_torch(model, self.inputs)
        return self._cache[key]

    def text_reference(self, part: str, case: str | None, multiplier: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        key = (part, case, multiplier)
        if key not in self._cache:
            torch_model = self.encoders[part]
            model = apply_reference(torch_model, self.state(case), part, multiplier) if case else copy.deepcopy(
                torch_model).double()
            hidden, pooled = run_torch_text(model, self.ids[part])
            self._cache[key] = hidden[HIDDEN_LAYER], pooled
        return self._cache[key]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("lycoris"))


def _snapshot(model) -> dict[str, np.ndarray]:
    return {name: np.array(value) for name, value in tree_flatten(model.parameters())}


def _assert_restored(before: dict[str, np.ndarray], model) -> None:
    after = _snapshot(model)
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))
    changed = [name for name, x in before.items()
               if not (x.dtype == after[name].dtype and np.array_equal(x, after[name]))]
    assert not changed, f"not restored bit for bit: {changed[:5]} ({len(changed)})"


def _apply(model, path, **kwargs):
    """apply_lora, every module of the file's part matched (no warning of unmatched modules)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", MlxUnetWarning)
        return lora.apply_lora(model, path, **kwargs)


def _text_errors(ours, reference) -> tuple[float, float]:
    return tuple(relative_error(np.array(x.astype(mx.float32)), ref) for x, ref in zip(ours, reference))


# ---------------------------------------------------------------------- the reference itself


# Three in the fast tier: the Tucker LoHa, and LoKr whole and decomposed.
FAST = ("loha_tucker", "lokr", "lokr_both")


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in ALL])
def test_definition_matches_peft(world, case):
    """Each module's delta by the definition (lycoris_files.module_delta) equals peft's, whose
    config built parameters of the file's shapes (LyCORIS's layout) wherever its rules can; each
    file moves every output it touches visibly; a plain LoHa file's UNet forward through peft's
    own (unmerged) layers equals the reference forward."""
    spec = ALL[case]
    state = world.state(case)
    unbalanced = {t.kohya_name for t in spec.targets if t.out_factors}
    worst, by_hand = 0.0, set()
    modules = {part: kohya_modules(world.models[part], part) for part in spec.parts()}
    for name, tensors in group_modules(state).items():
        module = modules[part_of(name)][name]
        ours = module_delta(tensors, tuple(module.weight.shape))
        theirs, natural = peft_delta(module, tensors)
        worst = max(worst, float((ours - theirs).abs().max() / ours.abs().max()))
        if not natural:
            by_hand.add(name)
    changes = {"unet": relative_error(world.unet_reference(case), world.unet_reference(None))}
    for part in spec.parts():
        if part != "unet":
            changes[part] = max(relative_error(x, y) for x, y in zip(world.text_reference(part, case),
                                                                      world.text_reference(part, None)))
    print(f"\n{case}: {len(group_modules(state))} modules, peft vs definition {worst:.1e}, output change "
          + ", ".join(f"{p} {c:.2f}" for p, c in changes.items()), end="")
    assert worst <= PEFT_BOUND
    assert by_hand == unbalanced  # peft cannot build LyCORIS's unbalanced factorization
    assert min(changes.values()) > VISIBLE
    if case == "loha":  # a whole plain LoHa file: one peft config can hold it
        peft_out = run_torch(peft_model(world.unet, state, "unet"), world.inputs)
        peft_error = relative_error(peft_out, world.unet_reference(case))
        print(f", peft's UNet forward {peft_error:.1e}", end="")
        assert peft_error <= 1e-6


# ---------------------------------------------------------------------- our models


@pytest.mark.parametrize("case", list(ALL))
def test_read_lora(world, case):
    spec = ALL[case]
    f = lora.read_lora(world.paths[case], allow_pickle=False)
    assert f.format == spec.format
    assert dict(f.parts) == spec.parts()


def _check_unet(world, case: str, fuse: bool, label: str) -> None:
    """Scale 1, then set_scale(0.6), then remove(): every parameter back bit for bit."""
    ours = mlx_from_torch(world.unet, world.config)
    before = _snapshot(ours)
    applied = _apply(ours, world.paths[case], fuse=fuse)
    errors = []
    for i, scale in enumerate(SCALES):
        if i:
            applied.set_scale(scale)
        errors.append(relative_error(run_mlx(ours, world.inputs), world.unet_reference(case, scale)))
    applied.remove()
    _assert_restored(before, ours)
    restored = relative_error(run_mlx(ours, world.inputs), world.unet_reference(None))
    print(f"\n{case} {'fused' if fuse else 'live'} [{label}]: "
          + ", ".join(f"scale {s} {e:.1e}" for s, e in zip(SCALES, errors)) + f", removed {restored:.1e}", end="")
    assert max(errors) <= FP32_BOUND
    assert restored <= FP32_BOUND


# A LoHa and a LoKr file with every form of convolution on both code paths; the others on the
# default one.
BOTH_PATHS = ["loha_tucker", "lokr_tucker"]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "live"])
@pytest.mark.parametrize("case", [c for c in CASES if c not in BOTH_PATHS])
def test_unet(world, case, fuse):
    _check_unet(world, case, fuse, "default path")


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "live"])
@pytest.mark.parametrize("case,code_path", each_value_once(BOTH_PATHS, list(CODE_PATHS)), indirect=["code_path"])
def test_unet_code_paths(world, case, fuse, code_path):
    _check_unet(world, case, fuse, code_path)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "live"])
@pytest.mark.parametrize("case", ["loha", "lokr_tucker"])
def test_unet_scale_argument_and_read_file(world, case, fuse):
    """apply_lora(model, LoRAFile, scale=0.6): the scale given at once, the file read beforehand."""
    ours = mlx_from_torch(world.unet, world.config)
    f = lora.read_lora(world.paths[case], allow_pickle=False)
    lora.apply_lora(ours, f, scale=0.6, fuse=fuse)
    error = relative_error(run_mlx(ours, world.inputs), world.unet_reference(case, 0.6))
    print(f"\n{case} {'fused' if fuse else 'live'} scale=0.6: {error:.1e}", end="")
    assert error <= FP32_BOUND


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "live"])
@pytest.mark.parametrize("part", list(ENCODERS))
@pytest.mark.parametrize("case", ["loha", "lokr"])
def test_text_encoders(world, case, part, fuse):
    """The file's lora_te1_ / lora_te2_ modules on CLIP ViT-L (no projection: part text_encoder
    by default) and bigG (projection: text_encoder_2); the part named explicitly when live."""
    config = world.encoder_configs[part]
    ours = mlx_text_encoder(world.encoders[part].state_dict(), config)
    before = _snapshot(ours)
    applied = _apply(ours, world.paths[case], fuse=fuse, **({} if fuse else {"part": part}))
    ids = mx.array(world.ids[part])
    errors = []
    for i, scale in enumerate(SCALES):
        if i:
            applied.set_scale(scale)
        errors.append(_text_errors(ours(ids, HIDDEN_LAYER), world.text_reference(part, case, scale)))
    applied.remove()
    _assert_restored(before, ours)
    restored = _text_errors(ours(ids, HIDDEN_LAYER), world.text_reference(part, None))
    print(f"\n{case} {part} {'fused' if fuse else 'live'}: "
          + ", ".join(f"scale {s} hidden {h:.1e} pooled {p:.1e}" for s, (h, p) in zip(SCALES, errors))
          + f", removed {max(restored):.1e}", end="")
    assert max(max(e) for e in errors) <= FP32_BOUND
    assert max(restored) <= FP32_BOUND


@pytest.mark.parametrize("case", ["loha_tucker", "lokr"])
def test_fp16(world, case):
    """Our float16 UNet, fused, against the float64 reference; remove() restores the float16 bits.
    The fused layers stay float16 (on the CPU kernels the rest is held in float32)."""
    ours = mlx_from_torch(world.unet, world.config, mx.float16)
    before = _snapshot(ours)
    applied = lora.apply_lora(ours, world.paths[case], fuse=True)
    out = run_mlx(ours, world.inputs)
    assert all(v.dtype == mx.float16 for name, v in tree_flatten(ours.parameters()) if name.endswith(".weight")
               and v.ndim > 1)
    error = relative_error(out, world.unet_reference(case))
    applied.remove()
    _assert_restored(before, ours)
    print(f"\n{case} float16 fused: {error:.1e}", end="")
    assert np.isfinite(out).all() and error <= FP16_BOUND


@pytest.mark.parametrize("case", list(NO_ALPHA))
def test_missing_alpha_scales_by_one(world, case):
    """A module without alpha: scale 1 (as A1111, ComfyUI and LyCORIS read it)."""
    ours = mlx_from_torch(world.unet, world.config)
    lora.apply_lora(ours, world.paths[case], fuse=True)
    error = relative_error(run_mlx(ours, world.inputs), world.unet_reference(case))
    print(f"\n{case}: {error:.1e}", end="")
    assert error <= FP32_BOUND


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "live"])
@pytest.mark.parametrize("case", list(SGM_CASES))
def test_unet_sgm_names(world, case, fuse):
    """Files naming the UNet's modules as kohya's sd-scripts do for SDXL (sgm's input_blocks /
    middle_block / output_blocks layout), text encoder modules beside them."""
    ours = mlx_from_torch(world.unet, world.config)
    before = _snapshot(ours)
    applied = _apply(ours, world.paths[case], fuse=fuse)
    error = relative_error(run_mlx(ours, world.inputs), world.unet_reference(case))
    applied.remove()
    _assert_restored(before, ours)
    print(f"\n{case} {'fused' if fuse else 'live'}: {error:.1e}", end="")
    assert error <= FP32_BOUND
