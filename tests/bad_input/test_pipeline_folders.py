"""Class 4, for pipeline folders: a broken converted folder is refused in one sentence from its
small files, before any weights load (a missing tokenizer/ used to fail after the UNet and VAE
had loaded, a missing text_encoder/ with a misleading width error)."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from bad_input_helpers import PROMPT, RUN, assert_user_error, run_cli, run_in_process, tree_digest

from mlx_unet import PipelineError, SDXLPipeline
from mlx_unet.pipelines.folder import PipelineFolder


def _index(folder):
    return json.loads((folder / "model_index.json").read_text())


def _write_index(folder, index):
    (folder / "model_index.json").write_text(json.dumps(index))


def _break(folder, case: str) -> str:
    """Break the copy ``folder`` as ``case`` says; the words its refusal must hold."""
    index = _index(folder)
    if case == "index not utf-8":
        (folder / "model_index.json").write_bytes(b'{"unet": ["diffusers", "UNet\xff"]}')
        return "model_index.json"
    if case == "index a list":
        _write_index(folder, [index])
        return "holds a JSON array where the model_index.json must be a JSON object"
    if case == "index nested deeply":
        (folder / "model_index.json").write_text("[" * 100_000)
        return "model_index.json"
    if case == "entry not a pair":
        _write_index(folder, {**index, "unet": "UNet2DConditionModel"})
        return "lists unet as 'UNet2DConditionModel', not [library, class]"
    if case == "entry of three":
        _write_index(folder, {**index, "vae": ["diffusers", "AutoencoderKL", "extra"]})
        return "lists vae as"
    if case == "force_zeros a string":
        _write_index(folder, {**index, "force_zeros_for_empty_prompt": "false"})
        return "force_zeros_for_empty_prompt to 'false', not true or false"
    if case == "no tokenizer folder":
        shutil.rmtree(folder / "tokenizer")
        return "lists tokenizer in model_index.json but has no tokenizer/ folder"
    if case == "no text_encoder folder":
        shutil.rmtree(folder / "text_encoder")
        return "lists text_encoder in model_index.json but has no text_encoder/ folder"
    if case == "tokenizer unlisted":
        _write_index(folder, {**index, "tokenizer": [None, None]})
        return "lists only one of tokenizer and text_encoder"
    if case == "no weights":
        (folder / "vae" / "model.safetensors").unlink()
        return "holds no .safetensors weights"
    if case == "unet config not utf-8":
        (folder / "unet" / "config.json").write_bytes(b"\xff\xfe{}")
        return "unet"
    if case == "encoder of another width":
        config = json.loads((folder / "text_encoder" / "config.json").read_text())
        (folder / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
        return "these models do not belong together"
    raise AssertionError(case)


CASES = ["index not utf-8", "index a list", "index nested deeply", "entry not a pair", "entry of three",
         "force_zeros a string", "no tokenizer folder", "no text_encoder folder", "tokenizer unlisted", "no weights",
         "unet config not utf-8", "encoder of another width"]


@pytest.mark.parametrize("case", CASES)
def test_broken_folders_are_refused_before_loading(tiny_pipeline, tmp_path, case, monkeypatch):
    folder = shutil.copytree(tiny_pipeline, tmp_path / "pipe")
    expected = _break(folder, case)
    before = tree_digest(folder)
    began = time.perf_counter()
    assert_user_error(run_in_process("generate", PROMPT, "--model", str(folder), "-o", str(tmp_path / "out.png"), *RUN),
                      expected)
    assert time.perf_counter() - began < 20
    assert not (tmp_path / "out.png").exists() and tree_digest(folder) == before

    import mlx_unet.weights as weights

    monkeypatch.setattr(weights, "load_weights_folder", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(PipelineError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        SDXLPipeline.from_pretrained(folder)


def test_a_missing_model_folder_is_named(tmp_path):
    assert_user_error(run_cli("generate", PROMPT, "--model", str(tmp_path / "nope"), *RUN),
                      f"{tmp_path / 'nope'} does not exist")
    (tmp_path / "file").write_text("x")
    # A file is taken for a single-file checkpoint (converted into the cache): this one is none.
    assert_user_error(run_cli("generate", PROMPT, "--model", str(tmp_path / "file"), *RUN),
                      str(tmp_path / "file"), "is not a safetensors file")


def test_the_intact_folder_reads(tiny_pipeline):
    parts = PipelineFolder.read(tiny_pipeline)
    assert parts.part("tokenizer") == tiny_pipeline / "tokenizer" and parts.force_zeros_for_empty_prompt is True
    assert parts.unet.cross_attention_dim == sum(c.hidden_size for c in parts.encoders)
