"""Quantized conversion options: a bad bit count, group size or mode, options that go with
--quantize given without it, text-encoder options with --unet-only, a mode this MLX lacks. One
sentence, exit code 2 (the API's error class), before anything is read or written."""

from __future__ import annotations

import json
import warnings

import pytest
from bad_input_helpers import assert_user_error, run_cli, tree_digest, write_diffusers_unet

import mlx_unet.convert.writer
from mlx_unet import UNetConfig
from mlx_unet.cli.convert import main
from mlx_unet.configs import quantization
from mlx_unet.convert import convert
from mlx_unet.errors import MlxUnetError, MlxUnetWarning

# (arguments after SOURCE OUT, what the one-line message must say)
BAD = {
    "bits": (["--quantize", "3"], "argument --quantize: invalid choice: 3 (choose from 8, 4)"),
    "bits not a number": (["--quantize", "eight"], "argument --quantize: invalid int value: 'eight'"),
    "group size": (["--quantize", "8", "--q-group-size", "48"], "argument --q-group-size: invalid choice: 48"),
    "mode's bits": (["--quantize", "8", "--q-mode", "mxfp4"], "mxfp4 quantization takes 4 bits, got 8."),
    "mode's group size": (["--quantize", "4", "--q-mode", "mxfp4", "--q-group-size", "64"],
                          "mxfp4 quantization takes groups of 32 weights, got 64."),
    "unknown mode": (["--quantize", "4", "--q-mode", "nf4"], "argument --q-mode: invalid choice: 'nf4'"),
    "group size alone": (["--q-group-size", "32"], "go with --quantize; add --quantize 8 or --quantize 4"),
    "mode alone": (["--q-mode", "mxfp8"], "go with --quantize"),
    "text encoders alone": (["--quantize-text-encoders", "8"], "go with --quantize"),
    "text encoders' bits": (["--quantize", "8", "--quantize-text-encoders", "2"],
                            "argument --quantize-text-encoders: invalid choice: '2'"),
    "text encoders with --unet-only": (["--quantize", "8", "--quantize-text-encoders", "4", "--unet-only"],
                                       "--quantize-text-encoders is for whole pipelines; drop it with --unet-only."),
}


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    return write_diffusers_unet(tmp_path_factory.mktemp("source") / "unet", UNetConfig.from_preset("tiny"))


@pytest.fixture
def nothing_read(monkeypatch):
    """Planning a source is where reading starts: a refusal must come before it."""
    def read(*args, **kwargs):
        raise AssertionError("the source was read")

    monkeypatch.setattr(mlx_unet.convert.writer, "plan_source", read)


def run_main(capsys, *args) -> tuple[int, str]:
    """``mlx-unet convert ARGS`` in this process: its exit code and stderr."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, message: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantization_options_are_refused_before_reading(tmp_path, unet_folder, capsys, nothing_read, case):
    args, message = BAD[case]
    before = tree_digest(unet_folder)
    assert_one_line(*run_main(capsys, unet_folder, tmp_path / "out", *args), message)
    assert not (tmp_path / "out").exists() and tree_digest(unet_folder) == before


@pytest.mark.parametrize("mode, bits", [("affine", "8"), ("mxfp8", "8"), ("mxfp4", "4")])
def test_a_mode_this_mlx_lacks(tmp_path, unet_folder, capsys, nothing_read, monkeypatch, mode, bits):
    monkeypatch.setattr(quantization, "mode_available", lambda mode: False)
    code, err = run_main(capsys, unet_folder, tmp_path / "out", "--quantize", bits, "--q-mode", mode)
    assert_one_line(code, err, f"has no {mode} quantization; upgrade MLX (pip install -U mlx)")
    with pytest.raises(MlxUnetError, match=f"has no {mode} quantization"):
        convert(unet_folder, tmp_path / "out", quantize=int(bits), q_mode=mode, progress=False)
    assert not (tmp_path / "out").exists()


API_BAD = [
    (dict(quantize=3), "affine quantization takes 8 or 4 bits, got 3."),
    (dict(quantize=True), "affine quantization takes 8 or 4 bits, got True."),
    (dict(quantize=8, q_group_size=48), "affine quantization takes groups of 32 or 64 or 128 weights, got 48."),
    (dict(quantize=8, q_mode="mxfp4"), "mxfp4 quantization takes 4 bits, got 8."),
    (dict(quantize=4, q_mode="int4"), "quantization mode 'int4' is not one of affine, mxfp8, mxfp4."),
    (dict(q_group_size=64), "--q-group-size goes with --quantize"),
    (dict(q_mode="mxfp8", quantize_text_encoders=8), "--q-mode and --quantize-text-encoders go with --quantize"),
    (dict(quantize=8, quantize_text_encoders=5), "the text encoders' quantization takes none, 8 or 4 bits, got 5."),
    (dict(quantize=8, quantize_text_encoders="none", unet_only=True), "--quantize-text-encoders is for whole pipelines"),
    (dict(quantize=quantization.Quantization.make(4), q_group_size=32), "quantize= is a Quantization already"),
]


@pytest.mark.parametrize("kwargs, message", API_BAD, ids=[str(k) for k, _ in API_BAD])
def test_bad_quantization_arguments_in_python(tmp_path, unet_folder, nothing_read, kwargs, message):
    with pytest.raises(MlxUnetError) as error:
        convert(unet_folder, tmp_path / "out", progress=False, **kwargs)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_text_encoder_bits_for_a_unet_alone_are_a_warning(tmp_path, unet_folder):
    """A source that holds only a UNet has no text encoders to quantize: said, not silently dropped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = convert(unet_folder, tmp_path / "out", quantize=8, quantize_text_encoders=4, progress=False)
    assert [str(w.message) for w in caught if issubclass(w.category, MlxUnetWarning)] == [
        "--quantize-text-encoders: the output has no text encoders (the source holds only a UNet)"]
    assert list(result.quantization) == ["unet"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mlx_unet"]["quantization"]["bits"] == 8


def test_as_a_user_runs_it(tmp_path, unet_folder):
    proc = run_cli("convert", str(unet_folder), str(tmp_path / "out"), "--quantize", "8", "--q-mode", "mxfp4")
    assert_user_error(proc, "mxfp4 quantization takes 4 bits, got 8.")
    assert not (tmp_path / "out").exists()
