"""The reference side of tests/parity/test_lora_diffusers.py: the LoRA files, the tiny diffusers
pipeline and its outputs with each file loaded by diffusers' own loader (or, where that loader
departs from the definition, the definition applied by hand), and the comparisons.

LoRA files in the formats people download, through our loader (``mlx_unet.lora``,
``SDXLPipeline.load_lora``) and through diffusers' own (``pipe.load_lora_weights`` on the same
tiny random SDXL pipeline), computed in the same run: UNet outputs, text-encoder outputs, whole
images; fused and live; one LoRA and two; scales; and removal restoring the weights bit for bit.

Each file is first checked to be applied by diffusers module for module: every module of the
file is wrapped by peft, and each wrapped module's weight change is the definition (see
``lora_files``). Where diffusers' loader departs from the definition the kinds concerned are
left out of the files compared with diffusers, and a file holding them (``kohya_definition``)
is compared with the definition applied to the torch models by hand instead. Measured on
diffusers 0.42 / peft 0.21 / transformers 5 (``test_definition_file_needs_the_by_hand_reference``
asserts it still holds):

* kohya names ``lora_unet_add_embedding_linear_1/2`` (diffusers' module names) are mapped to
  ``add.embedding.linear`` (``_convert_unet_lora_key`` strips the last index of any name with
  "emb" in it) and dropped with a warning. The sgm spelling ``label_emb_0_0/2`` works.
* kohya alphas that differ between modules reach peft's ``alpha_pattern`` under names that
  match no module for the UNet's attention projections (``...attn1.processor.to_q_lora.down.
  weight``), the text encoders' attention projections (the parent, ``...self_attn``) and the
  first text encoder's MLP (``text_model.`` kept, which transformers 5's CLIPTextModel no longer
  has): peft ignores them (a RuntimeWarning) and those modules get the file's most common alpha.
  The UNet's other kinds and the second encoder's MLP get their own.
* a module without an alpha gets the file's most common alpha, not its rank (kohya's rule).
So the kohya files compared with diffusers give those modules one alpha (3, the most common;
never a rank) and vary it elsewhere, and store every alpha. (PEFT files with diffusers'
``lora_adapter_metadata`` and the attention-processor format are applied as defined.)
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lora_files as lf
import mlx.core as mx
import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from mlx.utils import tree_flatten
from peft.tuners.tuners_utils import BaseTunerLayer
from pipeline_files import SIZE
from reference import relative_error, run_mlx, run_torch
from reference_text import run_torch as run_torch_text

from mlx_unet import CLIPTextModel, SDXLPipeline, UNet2DConditionModel, cpu

PROMPT = "a photo of an astronaut riding a horse, 35mm"
STEPS = 4
TEXT_PARTS = ("text_encoder", "text_encoder_2")
ALL_KINDS = {"unet": list(lf.UNET_KINDS), "text_encoder": list(lf.TEXT_KINDS),
             "text_encoder_2": list(lf.TEXT_KINDS)}
RANKS = (4, 4, 2, 8)
COMMON_ALPHA = 3.0


def _diffusers_safe_alpha(part: str, name: str, i: int, rank: int) -> float:
    """Alphas diffusers places right (see the module docstring): one alpha for the modules it
    cannot give their own, varied elsewhere, the common one staying the most common."""
    kind = lf.kind_of(part, name)
    own = (part == "unet" and kind != "attention") or (part == "text_encoder_2" and kind == "mlp")
    return (1.0, COMMON_ALPHA, 6.0, COMMON_ALPHA, 2.0)[i % 5] if own else COMMON_ALPHA


def _any_alpha(part: str, name: str, i: int, rank: int) -> float | None:
    """The definition's whole range: alphas varied on every kind, some missing (alpha = rank)."""
    return None if i % 7 == 3 else (COMMON_ALPHA, 1.0, 6.0, COMMON_ALPHA, 2.0)[i % 5]


def _peft_alpha(part: str, name: str, i: int, rank: int) -> float:
    return (8.0, 8.0, 2.0, 3.0, 16.0)[i % 5]


@dataclass
class LoRA:
    path: Path
    spec: lf.Spec
    format: str  # what lora.read_lora(path).format must say
    by_hand: bool = False  # compared with the definition applied by hand, not with diffusers


def lora_files_for(tmp: Path, pipe) -> dict[str, LoRA]:
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    # diffusers drops lora_unet_add_embedding_* (diffusers' names): compared by hand only.
    no_add_embedding = {**ALL_KINDS, "unet": [k for k in lf.UNET_KINDS if k != "add_embedding"]}
    kohya = lf.random_spec(models, no_add_embedding, seed=11, ranks=RANKS, alpha=_diffusers_safe_alpha)
    kohya_sgm = lf.random_spec(models, ALL_KINDS, seed=12, ranks=RANKS, alpha=_diffusers_safe_alpha)
    definition = lf.random_spec(models, ALL_KINDS, seed=13, ranks=RANKS, alpha=_any_alpha)
    peft = lf.random_spec(models, ALL_KINDS, seed=14, ranks=RANKS)  # no alphas: alpha = rank
    peft_metadata = lf.random_spec(models, ALL_KINDS, seed=15, ranks=RANKS, alpha=_peft_alpha)
    attention = {"unet": ["attention"], "text_encoder": list(lf.TEXT_KINDS), "text_encoder_2": list(lf.TEXT_KINDS)}
    attn_procs = lf.random_spec(models, attention, seed=16, ranks=RANKS)
    old = lf.random_spec(models, ALL_KINDS, seed=17, ranks=RANKS)  # no alphas: alpha = rank
    return {
        "kohya": LoRA(lf.write(tmp / "kohya.safetensors", lf.kohya_state(kohya)), kohya, "kohya LoRA"),
        "kohya_sgm": LoRA(lf.write(tmp / "kohya_sgm.safetensors", lf.kohya_state(kohya_sgm, "sgm", pipe.unet.config)),
                          kohya_sgm, "kohya LoRA"),
        "kohya_definition": LoRA(lf.write(tmp / "kohya_definition.safetensors", lf.kohya_state(definition)),
                                 definition, "kohya LoRA", by_hand=True),
        "peft": LoRA(lf.write(tmp / "peft.safetensors", lf.peft_state(peft)), peft, "diffusers/PEFT LoRA"),
        "peft_metadata": LoRA(lf.write(tmp / "peft_metadata.safetensors", lf.peft_state(peft_metadata),
                                       lf.peft_metadata(peft_metadata)), peft_metadata, "diffusers/PEFT LoRA"),
        "attn_procs": LoRA(lf.write(tmp / "attn_procs.safetensors", lf.attn_procs_state(attn_procs)), attn_procs,
                           "diffusers attention-processor LoRA"),
        "diffusers_old": LoRA(lf.write(tmp / "diffusers_old.safetensors", lf.old_diffusers_state(old)), old,
                              "diffusers LoRA (older format)"),
    }


FILES = ["kohya", "kohya_sgm", "kohya_definition", "peft", "peft_metadata", "attn_procs", "diffusers_old"]
DIFFUSERS_FILES = [name for name in FILES if name != "kohya_definition"]


@contextmanager
def _one_torch_thread():
    """These models are tiny: torch's threads gain nothing on them, and where another process
    holds a core they wait for each other at every operation (measured here: 17 ms per tiny
    convolution, an image ten times slower or more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _scale_key(scale) -> tuple:
    return tuple(sorted(scale.items())) if isinstance(scale, dict) else (scale,)


def _part_scale(scale, part: str) -> float:
    return scale[part] if isinstance(scale, dict) else scale


def wrapped(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Module]:
    """The modules of ``model`` that peft wrapped for ``adapter``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})}


def _text_name(name: str) -> str:
    return name if name.startswith(lf.TEXT_MODEL) else lf.TEXT_MODEL + name


@dataclass
class World:
    """The diffusers pipeline, our converted copy, the LoRA files, and the reference outputs
    computed so far: each combination of files and scales is loaded into diffusers once (the
    image tests come first in this file, so that their load serves the other tests too)."""

    pipe: StableDiffusionXLPipeline
    mlx: Path
    files: dict[str, LoRA]
    inputs: dict = field(default_factory=dict)
    ids: dict = field(default_factory=dict)
    latents: np.ndarray | None = None
    cache: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)  # file -> problems found when diffusers loaded it

    def models(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder,
                "text_encoder_2": self.pipe.text_encoder_2}

    def adapters_left(self) -> bool:
        return any(isinstance(m, BaseTunerLayer) for model in self.models().values() for m in model.modules())

    # ----------------------------------------------------------------------- the references

    @contextmanager
    def loaded(self, entries, by_hand: bool | None = None):
        """The pipeline with each (file, scale) of ``entries`` applied: by diffusers' loader (one
        adapter each, weighted by set_adapters), or, for the by-hand files (``by_hand`` None: as
        the files say), by the definition on copies of the models."""
        assert not self.adapters_left(), "adapters left over"
        if not entries:
            yield self.pipe
            return
        if by_hand is None:
            by_hand = any(self.files[name].by_hand for name, _ in entries)
        if by_hand:
            models = {}
            for part, model in self.models().items():
                models[part] = copy.deepcopy(model)
                for name, scale in entries:
                    lf.apply_by_hand(models[part], self.files[name].spec.get(part, {}), _part_scale(scale, part),
                                     in_place=True)
            pipe = StableDiffusionXLPipeline(**{**self.pipe.components, **models})
            pipe.set_progress_bar_config(disable=True)
            yield pipe
            return
        adapters = []
        try:
            for i, (name, _) in enumerate(entries):
                adapters.append(f"{name}_{i}")
                self.pipe.load_lora_weights(str(self.files[name].path), adapter_name=adapters[-1])
                if name not in self.coverage:
                    self.coverage[name] = self._coverage(name, adapters[-1])
            self.pipe.set_adapters(adapters, adapter_weights=[s for _, s in entries])
            yield self.pipe
        finally:
            self.pipe.unload_lora_weights()
            assert not self.adapters_left()

    @torch.no_grad()
    def _coverage(self, name: str, adapter: str) -> list[str]:
        """What diffusers did not apply as the file says: a module of the file not wrapped by peft,
        one wrapped that is not in the file, a weight change other than the definition's."""
        problems = []
        for part, pairs in self.files[name].spec.items():
            layers = wrapped(self.models()[part], adapter)
            if part != "unet":
                layers = {_text_name(n): layer for n, layer in layers.items()}
            print(f"{name}: {part}: {len(pairs)} modules in the file, {len(layers)} wrapped by diffusers")
            problems += [f"{part}: {n}: not applied" for n in sorted(set(pairs) - set(layers))]
            problems += [f"{part}: {n}: applied, not in the file" for n in sorted(set(layers) - set(pairs))]
            for module_name in sorted(set(pairs) & set(layers)):
                delta = layers[module_name].get_delta_weight(adapter).double()
                want = pairs[module_name].delta()
                error = float((delta - want).abs().max() / want.abs().max())
                if not delta.abs().max() > 0 or error > 1e-5:
                    problems.append(f"{part}: {module_name}: change off the definition by {error:.2e} (relative)")
        return problems

    @torch.no_grad()
    def reference(self, entries, image: bool = False, by_hand: bool | None = None) -> dict:
        """UNet output, text encoders' (last hidden state, pooled), and with ``image`` the image,
        for ``entries`` ((file, scale) pairs; scale a number or a per-part dict)."""
        key = (by_hand, *((name, _scale_key(scale)) for name, scale in entries))
        have = self.cache.get(key, {})
        if "unet" in have and (not image or "image" in have):
            return have
        with _one_torch_thread(), self.loaded(entries, by_hand) as pipe:
            out = {"unet": run_torch(pipe.unet, self.inputs)}
            for part in TEXT_PARTS:
                hidden, pooled = run_torch_text(getattr(pipe, part), self.ids[part])
                out[part] = (hidden[-1], pooled)
            if image:
                out["image"] = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE,
                                    latents=torch.from_numpy(self.latents).permute(0, 3, 1, 2).contiguous(),
                                    output_type="np").images
        self.cache[key] = out
        return out

    # --------------------------------------------------------------------------------- ours

    def unet(self) -> UNet2DConditionModel:
        # Loaded in the test, so that the code_path fixture's switch applies.
        return UNet2DConditionModel.from_pretrained(self.mlx / "unet", dtype=mx.float32)

    def text_encoder(self, part: str) -> CLIPTextModel:
        return CLIPTextModel.from_pretrained(self.mlx / part, dtype=mx.float32)

    def sdxl(self, **kwargs) -> SDXLPipeline:
        return SDXLPipeline.from_pretrained(self.mlx, dtype=mx.float32, **kwargs)

    def image(self, pipe: SDXLPipeline, **options) -> np.ndarray:
        return pipe(PROMPT, steps=STEPS, guidance=5.0, height=SIZE, width=SIZE, latents=mx.array(self.latents),
                    output="float", **options)

    def image_without_lora(self) -> np.ndarray:
        """Ours on the code path of the test (as exact as diffusers' without LoRA: see
        test_text_to_image), for the check that a LoRA changed the image."""
        key = ("image", os.environ.get(cpu.ENV_SWITCH))
        if key not in self.cache:
            self.cache[key] = self.image(self.sdxl())
        return self.cache[key]


# --------------------------------------------------------------------------- comparisons


def unet_error(world: World, unet, reference: dict) -> float:
    ours = run_mlx(unet, world.inputs)
    error = relative_error(ours, reference["unet"])
    change = relative_error(reference["unet"], world.reference([])["unet"])
    print(f"UNet: relative error {error:.2e} (the LoRA changes the output by {change:.2e})")
    assert change > 1e-2  # the LoRA matters
    return error


def text_error(world: World, part: str, encoder, reference: dict) -> float:
    hidden, pooled = encoder(mx.array(world.ids[part]), hidden_layer=-1)
    theirs_hidden, theirs_pooled = reference[part]
    errors = relative_error(np.array(hidden), theirs_hidden), relative_error(np.array(pooled), theirs_pooled)
    change = relative_error(theirs_hidden, world.reference([])[part][0])
    print(f"{part}: relative error {errors[0]:.2e} (last hidden state), {errors[1]:.2e} (pooled); "
          f"the LoRA changes the hidden state by {change:.2e}")
    assert change > 1e-2
    return max(errors)


def compare_images(ours: np.ndarray, theirs: np.ndarray, without: np.ndarray) -> None:
    """As test_text_to_image's: within 1e-3, uint8 +-1 on under 1% of the values; and the LoRA
    visibly changed the image."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    for item, (mine, their) in enumerate(zip(ours, theirs)):
        error = float(np.abs(mine.astype(np.float64) - their).max())
        off = np.abs((mine * 255).round().astype(np.int16) - (their * 255).round().astype(np.int16))
        change = float(np.abs(their - without[item]).max())
        print(f"image {item}: max abs error {error:.2e}; uint8 max diff {off.max()}, "
              f"{np.mean(off > 0):.4%} of values differ; the LoRA changes it by up to {change:.2f}")
        assert their.std() > 0.05 and np.mean((their > 0) & (their < 1)) > 0.5  # not a flat clamp
        assert change > 0.05
        assert error <= 1e-3
        assert off.max() <= 1 and np.mean(off > 0) < 0.01


def parameters(model) -> dict[str, np.ndarray]:
    return {name: np.array(value) for name, value in tree_flatten(model.parameters())}


def assert_identical(before: dict[str, np.ndarray], model, what: str) -> None:
    after = parameters(model)
    assert sorted(after) == sorted(before), f"{what}: not the same parameters"
    differ = {name: float(np.abs(after[name].astype(np.float64) - before[name]).max())
              for name in before if not np.array_equal(after[name], before[name])}
    assert not differ, f"{what}: {len(differ)} parameters differ, by up to {max(differ.values()):.2e}: " \
                       f"{sorted(differ)[:3]}"
