"""LoRA files in the formats people download, through our loader (``mlx_unet.lora``,
``SDXLPipeline.load_lora``) and through diffusers' own (``pipe.load_lora_weights`` on the same
tiny random SDXL pipeline), computed in the same run: UNet outputs, text-encoder outputs, whole
images; fused and live; one LoRA and two; scales; and removal restoring the weights bit for bit.
The files, the references and diffusers' departures from the definition: ``lora_reference``."""

from __future__ import annotations

import lora_files as lf
import numpy as np
import pytest
import torch
from lora_reference import COMMON_ALPHA, DIFFUSERS_FILES, FILES, PROMPT, TEXT_PARTS, World, assert_identical, \
    compare_images, lora_files_for, parameters, text_error, unet_error
from pipeline_files import SIZE, diffusers_pipeline
from reference import make_inputs, relative_error, tiny_config
from reference_text import token_ids

from mlx_unet import CLIPTextModel
from mlx_unet import lora as lora_package
from mlx_unet.convert import convert

# Two or more adapters on a model, and diffusers' warning about it: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")

FP32_BOUND = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    pipe, folder = diffusers_pipeline(tmp, refiner=False)
    convert(folder, tmp / "mlx", dtype="float32", progress=False)
    world = World(pipe, tmp / "mlx", lora_files_for(tmp, pipe))
    world.inputs = make_inputs(tiny_config("sdxl-base"), batch=2, height=8, width=8, seed=3)
    for part in TEXT_PARTS:
        config = CLIPTextModel.from_pretrained(tmp / "mlx" / part).config
        world.ids[part] = token_ids(config, batch=2, length=20, seed=4)
    world.latents = np.random.default_rng(5).standard_normal((1, SIZE // 8, SIZE // 8, 4), dtype=np.float32)
    return world


@pytest.fixture(scope="module")
def lora():
    return lora_package


# ----------------------------------------------------------------------------------- images
# First in the file: a reference made with its image serves the other tests of its file too.


@torch.no_grad()
@pytest.mark.parametrize("fuse", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["fused", "live"])
def test_kohya_image_on_both_code_paths(world, lora, code_path, fuse):
    reference = world.reference([("kohya_sgm", 1.0)], image=True)
    pipe = world.sdxl()
    handle = pipe.load_lora(world.files["kohya_sgm"].path, fuse=fuse)
    image = world.image(pipe)
    compare_images(image, reference["image"], world.image_without_lora())
    # The text encoders are released after each prompt; loaded again, they get the LoRA again.
    assert np.array_equal(world.image(pipe), image)
    handle.remove()
    assert np.array_equal(world.image(pipe), world.image_without_lora())


@torch.no_grad()
@pytest.mark.parametrize("fuse", [pytest.param(True, marks=pytest.mark.slow), False], ids=["fused", "live"])
def test_a_unet_released_before_the_decode_comes_back_with_its_loras(world, fuse):
    """release_unet frees the UNet before the decode (a one-shot run's last image); the next call
    loads it again and applies the pipeline's LoRAs to it again: the same image, bit for bit."""
    pipe = world.sdxl()
    pipe.load_lora(world.files["kohya_sgm"].path, fuse=fuse)
    image = world.image(pipe)
    seen = []
    released = world.image(pipe, release_unet=True, callback=lambda stage, step: seen.append(pipe._unet))
    assert seen[-1] is not None and pipe._unet is None
    assert np.array_equal(released, image)
    assert np.array_equal(world.image(pipe), image) and pipe._unet is not None
    assert not np.array_equal(image, world.image_without_lora())


TWO = [("kohya", 0.6), ("peft_metadata", 1.3)]  # overlapping modules, different formats and scales


@pytest.mark.slow
@torch.no_grad()
def test_two_loras_make_the_same_image(world, lora):
    reference = world.reference(TWO, image=True)
    pipe = world.sdxl()
    for (name, scale), fuse in zip(TWO, (True, False)):
        pipe.load_lora(world.files[name].path, scale=scale, fuse=fuse)
    compare_images(world.image(pipe), reference["image"], world.image_without_lora())


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("name", [n for n in FILES if n != "kohya_sgm"])
def test_image_matches(world, lora, name):
    reference = world.reference([(name, 1.0)], image=True)
    pipe = world.sdxl()
    pipe.load_lora(world.files[name].path)
    compare_images(world.image(pipe), reference["image"], world.image_without_lora())


# ----------------------------------------------------------------- diffusers' own loader


@pytest.mark.parametrize("name", DIFFUSERS_FILES)
def test_diffusers_applies_every_module_as_defined(world, name):
    """The reference is diffusers only where diffusers does what the file says: every module
    of the file wrapped by peft (no more, no fewer), each adding the definition's change
    (checked when the file is first loaded into diffusers)."""
    world.reference([(name, 1.0)])
    assert world.coverage[name] == []


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")
def test_definition_file_needs_the_by_hand_reference(world):
    """What diffusers' loader does with the kinds left out of the files compared with it (see
    the module docstring). Should this fail after a diffusers upgrade, diffusers now follows
    the definition there: the kinds can move into the diffusers-compared files."""
    lora = world.files["kohya_definition"]
    with world.loaded([("kohya_definition", 1.0)], by_hand=False):
        wrong = world.coverage.pop("kohya_definition")
    print(f"{len(wrong)} modules of kohya_definition not applied as defined by diffusers, e.g.:")
    print("\n".join(wrong[:8]))
    assert "unet: add_embedding.linear_1: not applied" in wrong
    assert "unet: add_embedding.linear_2: not applied" in wrong
    off = {line.split(": ")[1] for line in wrong}
    missing = {name for pairs in lora.spec.values() for name, pair in pairs.items() if pair.alpha is None}
    assert missing <= off, "a missing alpha is now taken as the rank"
    attention = {n for n, pair in lora.spec["unet"].items()
                 if lf.kind_of("unet", n) == "attention" and pair.alpha != COMMON_ALPHA}
    assert attention <= off, "the UNet's attention modules now get their own alphas"
    text = {n for p in TEXT_PARTS for n, pair in lora.spec[p].items()
            if lf.kind_of(p, n) == "attention" and pair.alpha != COMMON_ALPHA}
    assert text <= off, "the text encoders' attention modules now get their own alphas"


@pytest.mark.slow
@torch.no_grad()
def test_by_hand_reference_agrees_with_diffusers_where_diffusers_follows_the_definition(world):
    """The by-hand reference (the one for ``kohya_definition``) against diffusers' loader on
    files diffusers applies as defined, two at once with scales: the two references agree."""
    by_hand, theirs = world.reference(TWO, by_hand=True), world.reference(TWO)
    errors = [relative_error(by_hand["unet"], theirs["unet"])]
    for part in TEXT_PARTS:
        errors += [relative_error(a, b) for a, b in zip(by_hand[part], theirs[part])]
    print(f"by hand vs diffusers: relative errors {', '.join(f'{e:.1e}' for e in errors)}")
    assert max(errors) <= 1e-5


# ------------------------------------------------------------------------------ our loader


@pytest.mark.parametrize("name", FILES)
def test_format_is_named(world, lora, name):
    read = lora.read_lora(world.files[name].path)
    print(f"{name}: {read.format!r}, {read.parts}")
    expected = world.files[name].format
    assert read.format == expected or read.format.startswith(expected + " (")  # details may follow
    assert dict(read.parts) == lf.count(world.files[name].spec)


LIVE_IN_FAST_TIER = ("kohya_sgm", "peft_metadata")  # every kind of layer; the other files' live runs: slow


@pytest.mark.parametrize("name,fuse", [
    pytest.param(name, fuse, id=f"{name}-{'fused' if fuse else 'live'}",
                 marks=[] if fuse or name in LIVE_IN_FAST_TIER else [pytest.mark.slow])
    for name in FILES for fuse in (True, False)])
def test_unet_and_text_encoders_match(world, lora, name, fuse):
    reference = world.reference([(name, 1.0)])
    unet = world.unet()
    lora.apply_lora(unet, world.files[name].path, fuse=fuse)
    assert unet_error(world, unet, reference) <= FP32_BOUND
    for part in TEXT_PARTS:
        encoder = world.text_encoder(part)
        lora.apply_lora(encoder, world.files[name].path, fuse=fuse)  # the part from the model
        assert text_error(world, part, encoder, reference) <= FP32_BOUND


@pytest.mark.parametrize("fuse", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["fused", "live"])
def test_scale_and_set_scale(world, lora, fuse):
    """``scale`` is diffusers' adapter weight (alpha / rank applied inside, per module: a file
    whose alpha / rank varies); ``set_scale`` changes it afterwards."""
    name = "kohya_definition"
    path = world.files[name].path
    unet, encoder = world.unet(), world.text_encoder("text_encoder")
    applied = [lora.apply_lora(unet, lora.read_lora(path), scale=-0.7, fuse=fuse),
               lora.apply_lora(encoder, path, part="text_encoder", scale=-0.7, fuse=fuse)]
    for scale in (-0.7, 1.0):
        if scale != -0.7:
            for a in applied:
                a.set_scale(scale)
        reference = world.reference([(name, scale)])
        print(f"scale {scale}:")
        assert unet_error(world, unet, reference) <= FP32_BOUND
        assert text_error(world, "text_encoder", encoder, reference) <= FP32_BOUND


@torch.no_grad()
@pytest.mark.parametrize("fuse", [pytest.param(True, marks=pytest.mark.slow), False], ids=["fused", "live"])
def test_pipeline_scales_per_part_and_set_scale(world, lora, fuse):
    """``unet_scale`` / ``text_encoder_scale``: diffusers' per-component adapter weights; the
    pipeline's UNet and (kept) text encoders after ``load_lora``; then ``handle.set_scale(s)``,
    which gives every part ``s``."""
    name = "kohya_sgm"
    pipe = world.sdxl(keep_text_encoders=True)
    pipe.encode_prompt(PROMPT)  # the text encoders loaded before the LoRA
    handle = pipe.load_lora(world.files[name].path, fuse=fuse, unet_scale=0.8, text_encoder_scale=0.5)
    for scale in ({"unet": 0.8, "text_encoder": 0.5, "text_encoder_2": 0.5}, 1.0):
        if scale == 1.0:
            handle.set_scale(1.0)
        reference = world.reference([(name, scale)])
        print(f"scale {scale}:")
        assert unet_error(world, pipe.unet, reference) <= FP32_BOUND
        for part, encoder in zip(TEXT_PARTS, pipe.loaded_text_encoders):
            assert text_error(world, part, encoder, reference) <= FP32_BOUND


@pytest.mark.parametrize("fuses", [pytest.param((True, True), marks=pytest.mark.slow),
                                   pytest.param((False, False), marks=pytest.mark.slow), (True, False)],
                         ids=["fused+fused", "live+live", "fused+live"])
def test_two_loras(world, lora, fuses):
    reference = world.reference(TWO)
    unet = world.unet()
    encoders = {part: world.text_encoder(part) for part in TEXT_PARTS}
    for (name, scale), fuse in zip(TWO, fuses):
        lora.apply_lora(unet, world.files[name].path, scale=scale, fuse=fuse)
        for encoder in encoders.values():
            lora.apply_lora(encoder, world.files[name].path, scale=scale, fuse=fuse)
    assert unet_error(world, unet, reference) <= FP32_BOUND
    for part, encoder in encoders.items():
        assert text_error(world, part, encoder, reference) <= FP32_BOUND


# -------------------------------------------------------------------------------- removal


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "live"])
def test_remove_restores_every_weight_bit_for_bit(world, lora, fuse):
    models = {"unet": world.unet(), **{part: world.text_encoder(part) for part in TEXT_PARTS}}
    before = {part: parameters(model) for part, model in models.items()}
    applied = {part: [lora.apply_lora(model, world.files[name].path, scale=s, fuse=fuse) for name, s in TWO]
               for part, model in models.items()}
    if fuse:
        for part, model in models.items():
            after = parameters(model)
            assert any(not np.array_equal(after[k], before[part][k]) for k in after), f"{part}: nothing fused"
    for part, model in models.items():
        for a in applied[part]:  # the first applied first: not in the reverse order
            a.remove()
        assert_identical(before[part], model, part)


@torch.no_grad()
def test_pipeline_remove_and_unload_restore_everything(world, lora):
    pipe = world.sdxl(keep_text_encoders=True)
    embeddings = pipe.encode_prompt(PROMPT, "blurry")
    before = {"unet": parameters(pipe.unet),
              **{part: parameters(e) for part, e in zip(TEXT_PARTS, pipe.loaded_text_encoders)}}

    def assert_restored(what: str) -> None:
        assert_identical(before["unet"], pipe.unet, f"UNet after {what}")
        for part, encoder in zip(TEXT_PARTS, pipe.loaded_text_encoders):
            assert_identical(before[part], encoder, f"{part} after {what}")
        again = pipe.encode_prompt(PROMPT, "blurry")
        for field_name, value in vars(embeddings).items():
            if value is not None:
                assert np.array_equal(np.array(getattr(again, field_name)), np.array(value)), (what, field_name)

    for fuse in (True, False):
        handle = pipe.load_lora(world.files["kohya_sgm"].path, fuse=fuse)
        changed = pipe.encode_prompt(PROMPT, "blurry")
        assert not np.array_equal(np.array(changed.context), np.array(embeddings.context))
        handle.remove()
        assert_restored(f"handle.remove() ({'fused' if fuse else 'live'})")
    for (name, scale), fuse in zip(TWO, (True, False)):
        pipe.load_lora(world.files[name].path, scale=scale, fuse=fuse)
    pipe.unload_loras()
    assert_restored("unload_loras()")


def test_removing_the_first_of_two_fused_loras_leaves_the_second(world, lora):
    (first, s1), (second, s2) = TWO
    both, alone = world.unet(), world.unet()
    applied = lora.apply_lora(both, world.files[first].path, scale=s1)
    lora.apply_lora(both, world.files[second].path, scale=s2)
    applied.remove()
    lora.apply_lora(alone, world.files[second].path, scale=s2)
    assert_identical(parameters(alone), both, "UNet with the first of two fused LoRAs removed")
