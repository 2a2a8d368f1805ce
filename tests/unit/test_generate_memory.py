"""``mlx-unet generate`` frees the UNet before the last image's decode (the decode then has the
memory to itself) and keeps it for the images before, whose denoising needs it again; a pipeline
loads its UNet only after the first prompt is encoded."""

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_unet import cli, load_pipeline
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
    monkeypatch.setattr(diffusion, "_load_unet", lambda *a: events.append("UNet") or load_unet(*a))

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
