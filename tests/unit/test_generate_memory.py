"""``mlx-unet generate`` frees the UNet before the last image's decode (the decode then has the
memory to itself) and keeps it for the images before, whose denoising needs it again."""

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
