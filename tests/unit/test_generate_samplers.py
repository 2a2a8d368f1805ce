"""``mlx-unet generate``'s samplers, few-step defaults and prompt options, on the demo's tiny
pipeline (MLX alone): what the command picks is what the API makes with the same settings, and
each PNG records it."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from lora_factors import kohya_file
from PIL import Image

from mlx_unet import cli, load_pipeline
from mlx_unet.demo import write_demo_pipeline
from mlx_unet.pipelines.diffusion import DiffusionPipeline
from mlx_unet.pipelines.parameters import parse_parameters

PROMPT = "a lighthouse at dusk"
SIZE = ["--height", "64", "--width", "64", "--dtype", "float32"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_pipeline(tmp_path_factory.mktemp("demo") / "pipeline")


def renamed(demo, tmp_path, name, scheduler=None):
    """The demo pipeline in a folder called ``name`` (as a user's sdxl-turbo), with ``scheduler``
    as its shipped scheduler config."""
    folder = tmp_path / name
    shutil.copytree(demo, folder)
    if scheduler is not None:
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler}))
    return folder


def generate(*args):
    return cli.main(["generate", PROMPT, *SIZE, *args])


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image), parse_parameters(image.text["parameters"]).fields, \
            json.loads(image.text["mlx-unet"])["settings"]


def api_image(folder, **run):
    pipe = load_pipeline(folder, dtype=mx.float32)
    scheduler = run.pop("scheduler_config", None)
    if scheduler is not None:
        run["scheduler"] = pipe.parts.make_scheduler(*scheduler[:1], **scheduler[1])
    return pipe(PROMPT, height=64, width=64, seed=3, **run)[0]


def test_a_turbo_model_runs_its_own_sampler_steps_and_guidance(demo, tmp_path, capsys):
    turbo = renamed(demo, tmp_path, "sdxl-turbo")
    assert generate("--model", str(turbo), "--seed", "3", "-o", str(tmp_path / "t.png")) == 0
    assert "few-step model, Turbo: euler_a (trailing spacing), 1 step, guidance 0" in capsys.readouterr().err
    image, fields, settings = pixels(tmp_path / "t.png")
    assert (settings["steps"], settings["guidance"], settings["scheduler"]) == (1, 0.0, "euler_a")
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"]) == ("1", "Euler a", "0")
    expected = api_image(turbo, steps=1, guidance=0.0, scheduler_config=("euler_a", {"timestep_spacing": "trailing"}))
    assert np.array_equal(image, expected)
    # What is typed wins; the rest stays the model's.
    assert generate("--model", str(turbo), "--seed", "3", "--steps", "2", "-o", str(tmp_path / "t2.png")) == 0
    image, _, settings = pixels(tmp_path / "t2.png")
    assert (settings["steps"], settings["guidance"]) == (2, 0.0)
    expected = api_image(turbo, steps=2, guidance=0.0, scheduler_config=("euler_a", {"timestep_spacing": "trailing"}))
    assert np.array_equal(image, expected)
    # Without a size, Turbo's 512 px (whatever its UNet config says: a single file's says 1024).
    assert cli.main(["generate", PROMPT, "--model", str(turbo), "--quiet", "-o", str(tmp_path / "t3.png")]) == 0
    assert pixels(tmp_path / "t3.png")[0].shape == (512, 512, 3)


def test_a_lightning_lora_sets_a_trailing_euler_run_of_its_steps(demo, tmp_path, capsys):
    pipe = load_pipeline(demo, dtype=mx.float32)
    lora = tmp_path / "sdxl_lightning_2step_lora.safetensors"
    kohya_file(lora, pipe.unet, rank=2, seed=4)
    assert generate("--model", str(demo), "--lora", str(lora), "--seed", "3", "-o", str(tmp_path / "l.png")) == 0
    assert "SDXL-Lightning 2-step: euler (trailing spacing), 2 steps, guidance 0" in capsys.readouterr().err
    image, _, settings = pixels(tmp_path / "l.png")
    assert (settings["steps"], settings["guidance"], settings["scheduler"]) == (2, 0.0, "euler")
    from mlx_unet.lora import read_lora

    pipe.load_lora(read_lora(lora), 1.0)
    expected = pipe(PROMPT, height=64, width=64, seed=3, steps=2, guidance=0.0,
                    scheduler=pipe.parts.make_scheduler("euler", timestep_spacing="trailing"))[0]
    assert np.array_equal(image, expected)


def test_a_shipped_lcm_scheduler_means_four_lcm_steps_without_guidance(demo, tmp_path, capsys):
    lcm = renamed(demo, tmp_path, "my-model", {"_class_name": "LCMScheduler", "original_inference_steps": 50})
    assert generate("--model", str(lcm), "--seed", "3", "-o", str(tmp_path / "c.png")) == 0
    assert "LCM: lcm, 4 steps, guidance 1" in capsys.readouterr().err
    image, fields, settings = pixels(tmp_path / "c.png")
    assert (settings["steps"], settings["guidance"], settings["scheduler"], fields["Sampler"]) == (4, 1.0, "lcm", "LCM")
    assert np.array_equal(image, api_image(lcm, steps=4, guidance=1.0))  # its shipped sampler by default


def test_an_ordinary_model_keeps_the_ordinary_defaults(demo, tmp_path, capsys):
    assert generate("--model", str(demo), "--seed", "3", "--steps", "2", "-o", str(tmp_path / "o.png")) == 0
    assert "few-step" not in capsys.readouterr().err
    _, _, settings = pixels(tmp_path / "o.png")
    assert (settings["guidance"], settings["scheduler"]) == (5.0, "euler")


@pytest.mark.parametrize("args,api", [
    (["--scheduler", "DPM++ 2M Karras"], dict(scheduler="dpmpp_2m", sigmas="karras")),
    pytest.param(["--scheduler", "euler", "--sigmas", "ays"], dict(scheduler="euler", sigmas="ays"),
                 marks=pytest.mark.slow),  # the fast tier: an A1111 name, a sampler and a schedule by option
    pytest.param(["--scheduler", "uni_pc"], dict(scheduler="unipc"), marks=pytest.mark.slow),
    (["--scheduler", "dpmpp_3m_sde", "--sigmas", "exponential"], dict(scheduler="dpmpp_3m_sde", sigmas="exponential")),
])
def test_samplers_by_any_name_and_sigma_schedules_make_what_the_api_makes(demo, tmp_path, args, api):
    out = tmp_path / "s.png"
    assert generate("--model", str(demo), "--seed", "3", "--steps", "3", "--quiet", "-o", str(out), *args) == 0
    image, fields, settings = pixels(out)
    assert np.array_equal(image, api_image(demo, steps=3, **api))
    assert (settings["scheduler"], settings.get("sigmas")) == (api["scheduler"], api.get("sigmas"))
    # Rerun from the PNG: the same image.
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-png", str(out), "--quiet", "-o", str(again)]) == 0
    assert np.array_equal(pixels(again)[0], image)


@pytest.mark.parametrize("args,message", [
    (["--scheduler", "DPM++ 2S a"], "has no sampler 'DPM++ 2S a'"),
    (["--scheduler", "euler_max"], "unknown sampler 'euler_max'"),
    (["--scheduler", "euler_a", "--sigmas", "karras"], "cannot run on the karras sigma schedule"),
    (["--scheduler", "DPM++ 2M Karras", "--sigmas", "beta"], "means karras sigmas"),
    (["--sigmas", "polyexponential"], "invalid choice"),
    (["--max-tokens", "150"], "invalid choice"),
])
def test_bad_sampler_options_are_one_line_and_exit_2(demo, tmp_path, args, message, capsys):
    try:  # options argparse refuses exit from the parser; the others return from the command
        code = generate("--model", str(demo), "--steps", "2", "-o", str(tmp_path / "x.png"), *args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x.png").exists()


def test_prompt_options_and_distinct_prompts_encoded_once(demo, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a (red:1.4) door\na blue door\na (red:1.4) door\n")
    calls = []
    encode = DiffusionPipeline.encode_prompt
    monkeypatch.setattr(DiffusionPipeline, "encode_prompt",
                        lambda self, prompt, *a, **k: calls.append((prompt, k)) or encode(self, prompt, *a, **k))
    out = tmp_path / "p.png"
    assert cli.main(["generate", "--prompts", str(prompts), *SIZE, "--model", str(demo), "--steps", "2", "--quiet",
                     "--seed", "1", "--no-prompt-weighting", "-o", str(out)]) == 0
    assert [prompt for prompt, _ in calls] == ["a (red:1.4) door", "a blue door"]
    assert all(k["prompt_weighting"] is False and k["max_tokens"] is None for _, k in calls)
    first, _, settings = pixels(out)
    assert settings["no_prompt_weighting"] is True
    third = pixels(tmp_path / "p-2.png")[0]
    assert np.array_equal(first, third)  # the same prompt and seed
    weighted = api_image(demo, steps=2)  # weighting on: another image than the literal brackets
    literal = load_pipeline(demo, dtype=mx.float32)("a (red:1.4) door", height=64, width=64, seed=1, steps=2,
                                                    prompt_weighting=False)[0]
    assert np.array_equal(first, literal) and not np.array_equal(first, weighted)
