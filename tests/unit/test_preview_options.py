"""``mlx-unet generate``'s tiny VAE options (--vae, --tiny-vae, --preview-every, --preview), the
full VAE's tiling options' mistakes, and the API's previews, on the demo pipeline and a tiny VAE written in MLX (no torch): each mistake is one
line and exit code 2 before any model loads, and what the command writes is what the API makes.
(Against diffusers: tests/parity/test_previews.py.)"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from mlx_unet import AutoencoderTiny, InputError, TinyVAEConfig, cli, load_pipeline
from mlx_unet.cli.generate_options import merged_settings, preview_path, without_defaults
from mlx_unet.demo import write_demo_pipeline
from mlx_unet.pipelines import previews
from mlx_unet.pipelines.sampler import Step

PROMPT = "a lighthouse at dusk"
RUN = ["--demo", "--height", "64", "--width", "64", "--steps", "2", "--seed", "3", "--dtype", "float32", "--quiet"]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A random tiny VAE (TAESD's structure at a small width) as mlx-unet convert writes one."""
    folder = tmp_path_factory.mktemp("tiny-vae")
    config = TinyVAEConfig.from_preset("tiny")
    mx.random.seed(5)
    model = AutoencoderTiny(config)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def _settings(*args: str):
    return merged_settings(vars(without_defaults().parse_args([PROMPT, *args])))[0]


@pytest.mark.parametrize("args,message", [
    (["--preview", "p.png"], "--preview names the file that --preview-every writes; add --preview-every N."),
    (["--preview-every", "0"], "--preview-every must be a number of steps, at least 1, got 0."),
    (["--tiny-vae", "madebyollin/taesd"], "--tiny-vae names the tiny VAE of --vae tiny and --preview-every"),
    (["--vae", "tiny", "--tile-vae"], "--tile-vae tiles the full VAE's decode"),
    (["--tile-vae", "--vae-memory-budget", "2"], "--vae-memory-budget decides when to tile the decode"),
    (["--vae-memory-budget", "0"], "--vae-memory-budget must be a positive number of GiB, got 0.0."),
    (["--vae-memory-budget", "nan"], "--vae-memory-budget must be a positive number of GiB, got nan."),
    (["--preview-every", "1", "--preview", "out.png", "-o", "out.png"], "would replace an output image"),
    (["--preview-every", "1", "--preview", "p.jpg"], "p.jpg must be a .png file"),
])
def test_mistakes_are_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", PROMPT, *RUN, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_usage_errors_exit_2(capsys):
    for args in (["--vae", "medium"], ["--preview-every", "two"], ["--tile-vae", "--no-tile-vae"]):
        with pytest.raises(SystemExit) as exit:
            cli.main(["generate", PROMPT, *RUN, *args])
        assert exit.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_preview_path_defaults_beside_the_output():
    outputs = [Path("out/image.png")]
    assert preview_path(_settings("-o", "out/image.png"), outputs) is None
    assert preview_path(_settings("-o", "out/image.png", "--preview-every", "3"), outputs) == \
        Path("out/image.preview.png")
    assert preview_path(_settings("--preview-every", "3", "--preview", "p.png"), outputs) == Path("p.png")


def test_generate_writes_drafts_and_previews_as_the_api_makes_them(tiny_vae, tmp_path):
    out, preview = tmp_path / "draft.png", tmp_path / "p.png"
    assert cli.main(["generate", PROMPT, *RUN, "-o", str(out), "--vae", "tiny", "--tiny-vae", str(tiny_vae),
                     "--preview-every", "1", "--preview", str(preview)]) == 0
    pipe = load_pipeline(write_demo_pipeline(tmp_path / "demo"), dtype=mx.float32)
    pipe.load_tiny_vae(tiny_vae)
    run = dict(height=64, width=64, steps=2, seed=3)
    with Image.open(out) as image:
        draft, settings = np.asarray(image), json.loads(image.text["mlx-unet"])["settings"]
    assert np.array_equal(draft, pipe(PROMPT, **run, vae="tiny")[0])
    assert not np.array_equal(draft, pipe(PROMPT, **run)[0])
    with Image.open(preview) as image:  # the last preview: the finished latents, by the tiny VAE
        assert image.format == "PNG" and np.array_equal(np.asarray(image), draft)
    assert (settings["vae"], settings["tiny_vae"]) == ("tiny", str(tiny_vae))
    assert "preview" not in settings and "preview_every" not in settings
    # --from-png reruns the draft, without previews.
    assert cli.main(["generate", "--from-png", str(out), "-o", str(tmp_path / "again.png"), "--quiet"]) == 0
    with Image.open(tmp_path / "again.png") as image:
        assert np.array_equal(np.asarray(image), draft)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "demo", "draft.png", "p.png"]


def test_previews_reach_the_callback_every_n_steps_and_at_the_last(tiny_vae):
    vae = AutoencoderTiny.from_pretrained(tiny_vae)
    latents = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))
    seen = []
    call = previews.checked_callback(vae, "full", 2, lambda stage, step: seen.append((stage, step)))
    for index in range(5):
        call("base", Step(index, 5, 999.0 - index, latents, 0.1))
    assert [step.preview is not None for _, step in seen] == [False, True, False, True, True]
    assert all(isinstance(step, previews.PreviewStep) and step.timestep == 999.0 - step.index for _, step in seen)
    assert np.array_equal(seen[1][1].preview, previews.decode(vae, latents))
    assert seen[1][1].preview.shape == (1, 64, 64, 3) and seen[1][1].preview.dtype == np.uint8
    assert previews.checked_callback(None, "full", None, print) is print  # nothing asked: the callback as given
    for args, message in (((None, "tiny", None, None), "vae='tiny' needs a tiny VAE"),
                          ((vae, "draft", None, None), "vae must be 'full' or 'tiny'"),
                          ((vae, "full", 1, None), "pass a callback"),
                          ((vae, "full", True, print), "preview_every must be an integer")):
        with pytest.raises(InputError, match=message):
            previews.checked_callback(*args)
