"""The ``parameters`` text of a PNG, in AUTOMATIC1111's web UI form: parsed from the web UI's own
output (literal examples of its two ways of naming samplers), and our text parsed back to what
was written."""

import pytest

from mlx_unet import InputError
from mlx_unet.cli import png_record
from mlx_unet.pipelines.parameters import (
    Parameters,
    clip_skip_field,
    clip_skip_of,
    format_parameters,
    number,
    parse_parameters,
    sampler_of,
    size_of,
)

# As web UI 1.6 writes it: a LoRA tag in the prompt, a weighted negative prompt, the sampler with
# its schedule in one name, quoted values holding a colon.
WEB_UI_1_6 = """masterpiece, best quality, a lighthouse on a cliff, <lora:add_detail:0.6>
Negative prompt: lowres, bad anatomy, (worst quality:1.4)
Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3470837470, Size: 512x768, Model hash: 6ce0161689, \
Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, \
Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03, badhand: 2cbd4b3d5aae", \
Version: v1.6.0"""

# As web UI 1.9+ writes it: the schedule apart from the sampler; a prompt of two lines; no negative.
WEB_UI_1_9 = """a watercolour of a harbour,
boats at dawn
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, Seed: 7, Size: 1024x1024, \
Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: v1.10.1"""


def test_the_web_uis_text_parses():
    p = parse_parameters(WEB_UI_1_6)
    assert p.prompt == "masterpiece, best quality, a lighthouse on a cliff, <lora:add_detail:0.6>"
    assert p.negative_prompt == "lowres, bad anatomy, (worst quality:1.4)"
    assert list(p.fields)[:6] == ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash"]
    assert p.fields["Lora hashes"] == "add_detail: 7c6bad76eb54"  # unquoted
    assert p.fields["TI hashes"] == "easynegative: c74b4e810b03, badhand: 2cbd4b3d5aae"
    assert p.fields["Version"] == "v1.6.0" and p.fields["Hires upscaler"] == "Latent"
    assert (number(p.fields, "Steps"), number(p.fields, "CFG scale", float), number(p.fields, "Seed")) == \
        (28, 7.0, 3470837470)
    assert size_of(p.fields) == (768, 512)  # (height, width) from WIDTHxHEIGHT
    assert sampler_of(p.fields) == ("dpmpp_2m", "karras")
    assert clip_skip_of(p.fields) == 1  # the web UI's 2: one layer before the last
    assert p.loras() == [("add_detail", 0.6)]
    assert p.prompt_without_loras() == "masterpiece, best quality, a lighthouse on a cliff,"

    q = parse_parameters(WEB_UI_1_9)
    assert q.prompt == "a watercolour of a harbour,\nboats at dawn" and q.negative_prompt == ""
    assert sampler_of(q.fields) == ("dpmpp_2m", "karras") and clip_skip_of(q.fields) is None
    assert number(q.fields, "CFG scale", float) == 4.5 and size_of(q.fields) == (1024, 1024)


def test_a_text_without_fields_is_all_prompt():
    p = parse_parameters("a cat: sitting, on a mat\nNegative prompt: dogs")
    assert p == Parameters("a cat: sitting, on a mat", "dogs", {})


@pytest.mark.parametrize("fields, ours", [
    ({"Sampler": "Euler a"}, ("euler_a", None)),
    ({"Sampler": "DPM++ 2M", "Schedule type": "Automatic"}, ("dpmpp_2m", None)),
    ({"Sampler": "DPM++ 2M", "Schedule type": "Karras"}, ("dpmpp_2m", "karras")),
    ({"Sampler": "Euler", "Schedule type": "Exponential"}, ("euler", "exponential")),
    ({"Sampler": "DPM++ 2M SDE", "Schedule type": "Align Your Steps"}, ("dpmpp_2m_sde", "ays")),
    ({"Sampler": "DPM++ SDE Karras"}, None),  # the Brownian-tree SDE sampler: not ours
    ({"Sampler": "DPM++ 2M", "Schedule type": "Polyexponential"}, None),
])
def test_samplers_are_named_as_the_web_ui_names_them(fields, ours):
    if ours is None:
        with pytest.raises(InputError):
            sampler_of(fields)
    else:
        assert sampler_of(fields) == ours


def test_our_text_parses_back_to_what_was_written():
    prompt = "a harbour at dawn: boats, gulls\nsecond line"
    fields = [("Steps", 30), ("Sampler", "DPM++ 2M Karras"), ("CFG scale", 5.0), ("Seed", 2**40), ("Size", "64x48"),
              ("Model", "models/a, b: c"), ("Denoising strength", None), ("Version", "mlx-unet 0.1.0")]
    text = format_parameters(prompt, "fog,\ngrey", fields, loras=[("ink", 0.8)])
    assert text.splitlines()[-1] == ('Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 1099511627776, '
                                     'Size: 64x48, Model: "models/a, b: c", Version: mlx-unet 0.1.0')
    p = parse_parameters(text)
    assert p.prompt == prompt + " <lora:ink:0.8>" and p.prompt_without_loras() == prompt
    assert p.negative_prompt == "fog,\ngrey" and p.loras() == [("ink", 0.8)]
    assert p.fields == {"Steps": "30", "Sampler": "DPM++ 2M Karras", "CFG scale": "5", "Seed": "1099511627776",
                        "Size": "64x48", "Model": "models/a, b: c", "Version": "mlx-unet 0.1.0"}


def test_clip_skip_counts_as_the_web_ui_does():
    assert [clip_skip_field(c) for c in (None, 0, 1, 2)] == [None, None, 2, 3]
    assert [clip_skip_of({"Clip skip": str(c)}) for c in (1, 2, 3)] == [None, 1, 2]


def test_an_unreadable_number_is_one_sentence():
    with pytest.raises(InputError, match="the parameters give Steps as 'many', not a number."):
        number({"Steps": "many"}, "Steps")


def test_the_record_keeps_what_changes_the_image():
    settings = dict(prompt="p", seed=3, steps=2, guidance=5.0, height=64, width=64, scheduler="euler",
                    output="x.png", quiet=True, batch_size=4, prompts=None, from_png="y.png", no_cache=True,
                    allow_pickle=True, refiner=None, refiner_start=0.8, quantize=None, q_mode="affine", lora=[],
                    lora_mode=None, tile_vae=False, low_memory=True, image=None, strength=None, demo=True)
    record = png_record.record(settings)
    assert record["format"] == png_record.RECORD_FORMAT and record["inputs"] == {}
    assert record["settings"] == dict(prompt="p", seed=3, steps=2, guidance=5.0, height=64, width=64,
                                      scheduler="euler", low_memory=True, demo=True)
