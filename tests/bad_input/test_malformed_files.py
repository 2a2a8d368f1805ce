"""Malformed files get one sentence naming the file and its problem, never a traceback: safetensors
headers (held to the reference loader's rules, which the ``safetensors`` package checks in the
same test) and every JSON or text file the package reads."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from bad_input_helpers import assert_user_error, run_cli, run_in_process, tree_digest
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from mlx_unet import CLIPTokenizer, UNet2DConditionModel, UNetConfig
from mlx_unet.convert import convert
from mlx_unet.errors import ConfigError, ConversionError, WeightsError
from mlx_unet.safetensors_io import SafetensorsReader, TensorSpec, write_safetensors
from mlx_unet.schedulers import EulerDiscreteScheduler


def safetensors_bytes(header: dict | bytes, data: bytes) -> bytes:
    """A safetensors file as the format lays it out: header length (u64 LE), JSON header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def f32(shape, begin, end) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


ENTRY = b'"dtype":"F32","shape":[2],"data_offsets":[0,8]'

# name -> (header, data bytes, what our message must say)
BAD_SAFETENSORS = {
    "float-offsets": ({"a": f32([2], 0.0, 8.0)}, bytes(8), "entry 'a' has data_offsets [0.0, 8.0]"),
    "bool-in-shape": ({"a": f32([True, 2], 0, 8)}, bytes(8), "entry 'a' has shape [True, 2]"),
    "overlapping": ({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, bytes(12),
                    "tensor 'b' at data bytes 4 to 12 overlaps the tensor before it"),
    "same-bytes": ({"a": f32([2], 0, 8), "b": f32([2], 0, 8)}, bytes(8), "overlaps the tensor before it"),
    "gap": ({"a": f32([1], 0, 4), "b": f32([1], 8, 12)}, bytes(12), "tensor 'b' at data bytes 8 to 12 leaves a gap"),
    "trailing-bytes": ({"a": f32([1], 0, 4)}, bytes(8), "the file has 4 bytes after its last tensor"),
    "field-twice": (b'{"a":{"dtype":"F16",' + ENTRY + b"}}", bytes(8), "the key 'dtype' appears twice"),
    "metadata-twice": (b'{"__metadata__":{},"__metadata__":{},"a":{' + ENTRY + b"}}", bytes(8),
                       "the key '__metadata__' appears twice"),
    "metadata-not-strings": ({"__metadata__": {"step": 1}, "a": f32([2], 0, 8)}, bytes(8),
                             "__metadata__ must map names to strings"),
    "deep-nesting": (b'{"a":' + b"[" * 100_000, b"", "nested too deeply"),
    "not-utf8": (b'{"\xff":{' + ENTRY + b"}}", bytes(8), "not UTF-8 text: byte 0xff"),
    "truncated": ({"a": f32([4], 0, 16)}, bytes(8), "is truncated: tensor 'a' ends at byte"),
}


@pytest.fixture
def bad_file(request, tmp_path) -> tuple[Path, str]:
    header, data, message = BAD_SAFETENSORS[request.param]
    path = tmp_path / "src" / f"{request.param}.safetensors"
    path.parent.mkdir()
    path.write_bytes(safetensors_bytes(header, data))
    with pytest.raises(SafetensorError):  # the reference refuses the same bytes
        load_file(path)
    return path, message


@pytest.mark.parametrize("bad_file", list(BAD_SAFETENSORS), indirect=True)
def test_reader_refuses_what_the_reference_refuses(bad_file):
    path, message = bad_file
    with pytest.raises(WeightsError) as err:
        SafetensorsReader(path)
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("bad_file", list(BAD_SAFETENSORS), indirect=True)
def test_convert_prints_one_line_and_writes_nothing(bad_file, tmp_path):
    path, message = bad_file
    before = tree_digest(path)
    assert_user_error(run_in_process("convert", str(path), str(tmp_path / "out")), str(path), message)
    assert tree_digest(path) == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("bad_file", list(BAD_SAFETENSORS), indirect=True)
def test_from_pretrained_validates_as_the_converter_does(bad_file, tmp_path):
    path, message = bad_file
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(UNetConfig.from_preset("tiny").to_dict()))
    (folder / "model.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(WeightsError) as err:
        UNet2DConditionModel.from_pretrained(folder)
    assert str(folder / "model.safetensors") in str(err.value) and message in str(err.value)
    assert "convert the model again" in str(err.value)


def test_a_tensor_name_given_twice_is_refused(tmp_path):
    # The reference keeps the last of the two silently, another reader the first: which weights a
    # model would get depends on the reader, so no reader of ours takes the file.
    path = tmp_path / "twice.safetensors"
    path.write_bytes(safetensors_bytes(b'{"a":{' + ENTRY + b'},"a":{' + ENTRY + b"}}", bytes(8)))
    with pytest.raises(WeightsError, match="the key 'a' appears twice"):
        SafetensorsReader(path)


def _valid_files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    files = {"ours": tmp_path / "ours.safetensors", "reference": tmp_path / "reference.safetensors"}
    values = mx.array(rng.standard_normal((3, 5)).astype(np.float32))
    write_safetensors(files["ours"], [TensorSpec("w", (3, 5), mx.float32, lambda: values),
                                      TensorSpec("h", (3, 5), mx.float16, lambda: values.astype(mx.float16))],
                      {"format": "mlx"})
    save_file({"x": rng.standard_normal((2, 2, 3)).astype(np.float16), "n": np.arange(4, dtype=np.int64),
               "empty": np.zeros((0, 3), np.float32)}, str(files["reference"]))
    # What the rules allow that writers rarely produce: entries out of file order, two empty
    # tensors at one offset, whitespace around the header.
    edge = {"b": f32([1], 4, 8), "z": f32([0], 0, 0), "y": f32([0], 0, 0), "a": f32([1], 0, 4)}
    files["edge"] = tmp_path / "edge.safetensors"
    files["edge"].write_bytes(safetensors_bytes(b"  " + json.dumps(edge).encode() + b"\n ",
                                                 np.array([1.5, -2.0], np.float32).tobytes()))
    return files


def test_valid_files_read_as_the_reference_reads_them(tmp_path):
    for path in _valid_files(tmp_path).values():
        expected = load_file(path)
        reader = SafetensorsReader(path)
        assert sorted(reader.keys()) == sorted(expected)
        for name, array in expected.items():
            ours = reader.read_numpy(name)
            assert ours.dtype == array.dtype and ours.shape == array.shape and np.array_equal(ours, array), name


# ---------------------------------------------------------------------- JSON and text files


def _unet_folder(root: Path) -> Path:
    folder = root / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(UNetConfig.from_preset("tiny").to_dict()))
    return folder


def _tokenizer_folder(root: Path) -> Path:
    folder = root / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return folder


def _convert(source: Path, root: Path):
    return lambda: convert(source, root / "out", progress=False)


def _unet_config(root):
    folder = _unet_folder(root)
    return folder / "config.json", lambda: UNetConfig.from_json(folder), ConfigError


def _converted_unet_config(root):
    folder = _unet_folder(root)
    return folder / "config.json", _convert(folder, root), ConfigError


def _shard_index(root):
    folder = _unet_folder(root)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("{}")
    return index, _convert(folder, root), ConversionError


def _model_index(root):
    folder = root / "pipeline"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    return folder / "model_index.json", _convert(folder, root), ConversionError


def _scheduler_config(root):
    root.mkdir()
    path = root / "scheduler_config.json"
    path.write_text("{}")
    return path, lambda: EulerDiscreteScheduler.from_config(path), ConfigError


def _vocab(root):
    folder = _tokenizer_folder(root)
    return folder / "vocab.json", lambda: CLIPTokenizer.from_folder(folder), ConfigError


def _merges(root):
    folder = _tokenizer_folder(root)
    return folder / "merges.txt", lambda: CLIPTokenizer.from_folder(folder), ConfigError


READERS = {"unet-config": _unet_config, "converted-unet-config": _converted_unet_config, "shard-index": _shard_index,
           "model-index": _model_index, "scheduler-config": _scheduler_config, "vocab": _vocab, "merges": _merges}
# problem -> (file contents, or "folder" / "unreadable"; what the message must say)
PROBLEMS = {
    "deep-nesting": (b"[" * 100_000, "nested too deeply"),
    "not-utf8": (b'{"name": "caf\xe9"}', "is not UTF-8 text: byte 0xe9 at offset 13"),
    "key-twice": (b'{"sample_size": 64, "sample_size": 128}', "the key 'sample_size' appears twice"),
    "folder": ("folder", "is a folder"),
    "unreadable": ("unreadable", "cannot be read (permission denied)"),
}
TEXT_PROBLEMS = ("not-utf8", "folder", "unreadable")
# model_index.json and scheduler_config.json are looked up with is_file(): a folder there is a
# different layout (a UNet folder, a pipeline root), not a malformed file.
LOOKED_UP = ("model-index", "scheduler-config")
CASES = [(reader, problem) for reader in READERS for problem in PROBLEMS
         if (reader != "merges" or problem in TEXT_PROBLEMS) and not (reader in LOOKED_UP and problem == "folder")]


@pytest.mark.parametrize(("reader", "problem"), CASES)
def test_bad_json_and_text_files_get_one_sentence(tmp_path, monkeypatch, reader, problem):
    path, call, error = READERS[reader](tmp_path / "src")
    content, message = PROBLEMS[problem]
    if content == "folder":
        path.unlink()
        path.mkdir()
    elif content != "unreadable":
        path.write_bytes(content)
    before = tree_digest(tmp_path / "src")
    if content == "unreadable":
        # Tests run as root here, and root reads a file whatever its mode: the denial is simulated.
        read_bytes = Path.read_bytes

        def denied(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(error) as err:
        call()
    monkeypatch.undo()
    text = str(err.value)
    assert text.startswith(str(path)) and message in text and text.endswith(".") and "\n" not in text, text
    assert tree_digest(tmp_path / "src") == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(("reader", "problem"), [("model-index", "deep-nesting"), ("shard-index", "not-utf8"),
                                                 ("converted-unet-config", "key-twice")])
def test_convert_prints_one_line_for_a_bad_json_file(tmp_path, reader, problem):
    path, _, _ = READERS[reader](tmp_path / "src")
    content, message = PROBLEMS[problem]
    path.write_bytes(content)
    before = tree_digest(tmp_path / "src")
    assert_user_error(run_cli("convert", str(path.parent), str(tmp_path / "out")), str(path), message)
    assert tree_digest(tmp_path / "src") == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_shard_index_may_name_only_files_beside_it(tmp_path):
    folder = _unet_folder(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(outside))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ConversionError, match="lists shard '../elsewhere.safetensors', which is not a file name"):
        convert(folder, tmp_path / "out", progress=False)
