"""``mlx-unet generate`` frees the UNet before the last image's decode (the decode then has the
memory to itself) and keeps it for the images before, whose denoising needs it again; a pipeline
loads its UNet only after the first prompt is encoded, runs a call in one reused heap, widens a
half-precision UNet for runs that pay, and does not narrow back a UNet it is about to free."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from test_cpu_heap import GIVEN_BACK, RAISED, FakeLibc

from mlx_unet import cli, load_pipeline
from mlx_unet.cpu import heap
from mlx_unet.demo import write_demo_pipeline
from mlx_unet.pipelines.diffusion import DiffusionPipeline

PROMPT = "a lighthouse at dusk"


def test_only_the_last_image_releases_the_unet_and_the_images_are_unchanged(tmp_path, monkeypatch):
    events = []
    release, call = DiffusionPipeline.release_unet, DiffusionPipeline.__call__
    monkeypatch.setattr(DiffusionPipeline, "release_unet", lambda self: events.append("release") or release(self))
    monkeypatch.setattr(DiffusionPipeline, "__call__",
                        lambda self, *a, **k: events.append("image") or call(self, *a, **k))
    out = tmp_path / "out.png"
    assert cli.main(["generate", PROMPT, "--demo", "--height", "64", "--width", "64", "--steps", "2", "--seed", "3",
                     "-n", "3", "--dtype", "float32", "--quiet", "-o", str(out)]) == 0
    assert events == ["image", "image", "image", "release"]
    monkeypatch.undo()
    pipe = load_pipeline(write_demo_pipeline(tmp_path / "demo"), dtype=mx.float32)
    for name, seed in (("out.png", 3), ("out-1.png", 4), ("out-2.png", 5)):
        with Image.open(tmp_path / name) as image:
            assert np.array_equal(np.asarray(image), pipe(PROMPT, height=64, width=64, steps=2, seed=seed)[0])


def test_the_unet_loads_after_the_prompt_is_encoded(tmp_path, monkeypatch):
    """A first call never holds the text encoders and the UNet at once: the UNet loads when the
    denoising needs it, after the encoders are released, and stays for the next call."""
    from mlx_unet.pipelines import diffusion

    events = []
    load_unet, encoders = diffusion._load_unet, DiffusionPipeline._text_encoders
    monkeypatch.setattr(diffusion, "_load_unet", lambda *a, **k: events.append("UNet") or load_unet(*a, **k))

    def recorded_encoders(self):
        events.append("encoders" if self._unet is None else "encoders beside the UNet")
        return encoders(self)

    monkeypatch.setattr(DiffusionPipeline, "_text_encoders", recorded_encoders)
    pipe = load_pipeline(write_demo_pipeline(tmp_path / "demo"), dtype=mx.float32)
    assert events == [] and pipe._unet is None
    first = pipe(PROMPT, height=64, width=64, steps=2, seed=3)
    assert events == ["encoders", "UNet"] and pipe._encoders is None
    assert np.array_equal(pipe(PROMPT, height=64, width=64, steps=2, seed=3), first)
    assert events == ["encoders", "UNet", "encoders beside the UNet"]  # (no second load)


def _recorded_heap(monkeypatch) -> list:
    """The calls ``cpu.heap`` makes to malloc, recorded in the list returned (which the test adds
    its own events to), in place of glibc's."""
    fake = FakeLibc()
    monkeypatch.setattr(heap, "_libc", fake)
    monkeypatch.delenv(heap.DISABLE_ENV, raising=False)
    return fake.calls


def test_a_call_runs_in_one_reused_heap_from_the_prompt_to_the_image(tmp_path, monkeypatch):
    """The memory the text encoders free is reused by the UNet's load, and the UNet's by the decode
    (``cpu.heap``): all three happen inside one outermost ``reused_heap`` block, which gives the
    freed memory back when the call ends."""
    from mlx_unet.pipelines import diffusion

    events = _recorded_heap(monkeypatch)

    def recorded(name, function):
        return lambda *a, **k: events.append((name, heap._depth)) or function(*a, **k)

    monkeypatch.setattr(diffusion, "_load_unet", recorded("UNet", diffusion._load_unet))
    monkeypatch.setattr(DiffusionPipeline, "_text_encoders", recorded("encoders", DiffusionPipeline._text_encoders))
    monkeypatch.setattr(DiffusionPipeline, "decode", recorded("decode", DiffusionPipeline.decode))
    pipe = load_pipeline(write_demo_pipeline(tmp_path / "demo"), dtype=mx.float32)
    events.clear()  # what loaded with the pipeline (its VAE) did so in blocks of its own
    image = pipe(PROMPT, height=64, width=64, steps=2, seed=3, release_unet=True)
    assert events == [*RAISED, ("encoders", 1), ("UNet", 1), ("decode", 1), *GIVEN_BACK]
    monkeypatch.undo()
    assert np.array_equal(image, load_pipeline(tmp_path / "demo", dtype=mx.float32)(
        PROMPT, height=64, width=64, steps=2, seed=3))


def test_the_command_encodes_its_prompts_and_loads_the_unet_in_one_reused_heap(tmp_path, monkeypatch):
    """``generate`` encodes every prompt before its first pipeline call: the memory the text
    encoders free is reused by the UNet's load only if both happen inside one outermost block."""
    from mlx_unet.pipelines import diffusion

    events = _recorded_heap(monkeypatch)

    def recorded(name, function):
        return lambda *a, **k: events.append((name, heap._depth > 0)) or function(*a, **k)

    monkeypatch.setattr(diffusion, "_load_unet", recorded("UNet", diffusion._load_unet))
    monkeypatch.setattr(DiffusionPipeline, "_text_encoders", recorded("encoders", DiffusionPipeline._text_encoders))
    assert cli.main(["generate", PROMPT, "--demo", "--height", "64", "--width", "64", "--steps", "2", "--seed", "3",
                     "--dtype", "float32", "--quiet", "-o", str(tmp_path / "out.png")]) == 0
    assert events == [*RAISED, ("encoders", True), ("UNet", True), *GIVEN_BACK]


def test_a_half_precision_unet_loads_once_in_half_precision_and_is_widened_only_by_runs_that_pay(tmp_path,
                                                                                                 monkeypatch):
    """On the CPU kernels a half-precision pipeline's UNet loads in half precision and computes in
    float32 (``cpu.widen``). A run too short to pay never widens it; a longer one holds it in
    float32 while it denoises (not when told not to) and narrows it back after, unless the UNet
    is released then, which pays from fewer steps; the images are the same."""
    from mlx_unet.cpu import ENV_SWITCH, widen
    from mlx_unet.pipelines import diffusion, run as run_settings

    monkeypatch.setenv(ENV_SWITCH, "1")  # the kernels' path, whatever the environment says
    loads, load_unet = [], diffusion._load_unet
    monkeypatch.setattr(diffusion, "_load_unet", lambda parts, dtype, q: loads.append(dtype) or load_unet(parts, dtype, q))
    run = dict(height=64, width=64, steps=2, seed=3)
    pipe = load_pipeline(write_demo_pipeline(tmp_path / "demo"), dtype=mx.float16)
    kept = pipe(PROMPT, **run)
    assert loads == [mx.float16] and pipe._unet.dtype == mx.float32 and widen.half_parameters(pipe._unet)
    longer = run | dict(steps=3)
    kept_longer = pipe(PROMPT, **longer)
    narrowed_back, widened = [], run_settings.widened
    monkeypatch.setattr(run_settings, "widened",
                        lambda unet, narrow_back: narrowed_back.append(narrow_back) or widened(unet, narrow_back))
    assert np.array_equal(pipe(PROMPT, **longer), kept_longer) and narrowed_back == []
    # From 2 forwards where the UNet is freed after the run, from 3 where it is narrowed back.
    monkeypatch.setattr(run_settings, "WIDEN_FROM_FORWARDS", 2)
    monkeypatch.setattr(run_settings, "NARROW_BACK_FORWARDS", 1)
    assert np.array_equal(pipe(PROMPT, **run), kept) and narrowed_back == []
    assert np.array_equal(pipe(PROMPT, **longer), kept_longer) and narrowed_back == [True]
    assert widen.half_parameters(pipe._unet)  # back in half precision
    assert np.array_equal(pipe(PROMPT, **longer, widen_weights=False), kept_longer) and narrowed_back == [True]
    assert np.array_equal(pipe(PROMPT, **run, release_unet=True), kept)
    assert narrowed_back == [True, False] and loads == [mx.float16] and pipe._unet is None


@pytest.mark.parametrize("flag, widen_weights", [(None, None), ("--widen-weights", True), ("--no-widen-weights", False)])
def test_the_widening_options_reach_the_run_and_are_not_recorded(tmp_path, monkeypatch, flag, widen_weights):
    """They change how fast and in how much memory an image is made, not the image."""
    seen, call = [], DiffusionPipeline.__call__
    monkeypatch.setattr(DiffusionPipeline, "__call__",
                        lambda self, *a, **k: seen.append(k["widen_weights"]) or call(self, *a, **k))
    out = tmp_path / "out.png"
    assert cli.main(["generate", PROMPT, "--demo", "--height", "64", "--width", "64", "--steps", "2", "--seed", "3",
                     "--quiet", *([flag] if flag else []), "-o", str(out)]) == 0
    assert seen == [widen_weights]
    with Image.open(out) as image:
        assert "widen" not in image.text["mlx-unet"] and "mlx-unet" in image.text


def test_the_two_widening_options_are_refused_together(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", PROMPT, "--demo", "--widen-weights", "--no-widen-weights"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
