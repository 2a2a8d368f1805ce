"""Cache entries and converted folders that link their source (``mlx_unet.linked``): the models
that converting would leave value for value as they are read from the source itself, and load
exactly as their copies do; what converting changes is copied."""

import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from mlx.utils import tree_flatten
from original_layout import SINGLE_FILE_FAMILIES, sdxl_single_file
from safetensors.torch import save_file
from test_cache import SMALL_VAE
from test_convert_pipeline import SMALL_TEXT, make_parts
from in_process import run_main

from mlx_unet import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, VAEConfig
from mlx_unet.cache import cached_pipeline
from mlx_unet.cli import convert as convert_command
from mlx_unet.cli.info import describe, format_info
from mlx_unet.convert import convert
from mlx_unet.errors import WeightsError
from mlx_unet.linked import LINKS
from mlx_unet.safetensors_io import SafetensorsReader


@pytest.fixture(scope="module")
def half_file(tmp_path_factory) -> Path:
    """A float16 SDXL refiner single file: OpenCLIP's fused and transposed projections, the VAE's
    1x1 attention kernels and the convolutions all need cutting or laying out as they load."""
    bigg = CLIPTextConfig.from_preset("sdxl-clip-bigg", **SMALL_TEXT)
    parts = make_parts(SINGLE_FILE_FAMILIES["sdxl-refiner"], None, bigg, VAEConfig.from_preset("sdxl", **SMALL_VAE), 96)
    states = {name: model.state_dict() for name, model in parts.models.items()}
    tensors = sdxl_single_file(states["unet"], parts.configs["unet"], states["text_encoder_2"], states["vae"])
    path = tmp_path_factory.mktemp("half") / "refiner.safetensors"
    # A float32 tensor that no model reads does not count (Stability's SDXL files hold OpenCLIP's logit_scale).
    save_file({name: value.half().contiguous() for name, value in tensors.items()} | {"logit_scale": torch.ones(())},
              str(path))
    return path


LINKED_PARTS = (("unet", UNet2DConditionModel), ("text_encoder_2", CLIPTextModel), ("vae", AutoencoderKL))


def _parameters(folder: Path, cls, **options) -> dict[str, mx.array]:
    return dict(tree_flatten(cls.from_pretrained(folder, **options).parameters()))


def _assert_same_parameters(ours: dict[str, mx.array], copied: dict[str, mx.array], what: str) -> None:
    assert ours.keys() == copied.keys(), what
    differ = [k for k in copied if ours[k].dtype != copied[k].dtype or not mx.array_equal(ours[k], copied[k]).item()]
    assert not differ, (what, differ[:5])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_local_source_is_linked_where_converting_changes_no_value(tmp_path, cache, half_file, dtype):
    """Every model of a float16 file keeps its values in a float16 or float32 run (the VAE is float32
    in both): the entry links them, and they load, with and without the CPU kernels, exactly as
    their copies do, in the dtype the copy holds."""
    folder = cached_pipeline(half_file, dtype=dtype, progress=False)
    copied = convert(half_file, tmp_path / "copy", dtype=dtype, progress=False).out_dir
    for part, cls in LINKED_PARTS:
        assert (folder / part / LINKS).is_file() and not list((folder / part).glob("*.safetensors")), part
        assert (copied / part / "model.safetensors").is_file(), part
        for kernels in (False, True):
            _assert_same_parameters(_parameters(folder / part, cls, cpu_kernels=kernels),
                                    _parameters(copied / part, cls, cpu_kernels=kernels), f"{part}, kernels {kernels}")
    # info reports a linked model as its copy: its size and dtype as it loads.
    linked_info, copied_info = describe(folder), describe(copied)
    assert {p: (i.bytes, i.dtypes) for p, i in linked_info.parts.items()} == \
        {p: (i.bytes, i.dtypes) for p, i in copied_info.parts.items()}
    assert all(part.linked for part in linked_info.parts.values())
    assert not any(part.linked for part in copied_info.parts.values())
    assert format_info(linked_info).count(", linked to its source") == 3
    # Quantizing as it loads reads the links as lazy arrays.
    _assert_same_parameters(_parameters(folder / "unet", UNet2DConditionModel, quantize=8),
                            _parameters(copied / "unet", UNet2DConditionModel, quantize=8), "unet, quantized on load")


@pytest.mark.slow  # a variant: float16 files are linked in the fast tier
def test_a_linked_bfloat16_file_loads_as_its_copy(tmp_path, half_file):
    """bfloat16 weights are read as their bits and viewed in MLX: linked, they load (in a
    bfloat16 and a float32 model) exactly as a copy does."""
    source = tmp_path / "bf16.safetensors"
    reader = SafetensorsReader(half_file)
    tensors = {k: torch.from_numpy(reader.read_numpy(k)) for k in reader.keys()}
    save_file({k: v.to(torch.bfloat16) if v.dtype == torch.float16 else v for k, v in tensors.items()}, str(source))
    for dtype in ("bfloat16", "float32"):
        linked = convert(source, tmp_path / f"linked-{dtype}", dtype=dtype, vae_dtype=dtype, link=True,
                         progress=False).out_dir
        copied = convert(source, tmp_path / f"copied-{dtype}", dtype=dtype, vae_dtype=dtype, progress=False).out_dir
        for part, cls in LINKED_PARTS:
            assert (linked / part / LINKS).is_file(), (dtype, part)
            _assert_same_parameters(_parameters(linked / part, cls), _parameters(copied / part, cls), f"{dtype} {part}")


def test_what_converting_would_change_is_copied(cache, half_file):
    """Rounding (float16 to bfloat16) and quantizing write copies; the float32 VAE beside them is linked."""
    for options in ({"dtype": "bfloat16"}, {"dtype": "float32", "quantize": 8}):
        folder = cached_pipeline(half_file, progress=False, **options)
        for part in ("unet", "text_encoder_2"):
            assert (folder / part / "model.safetensors").is_file() and not (folder / part / LINKS).exists(), options
        assert (folder / "vae" / LINKS).is_file(), options


def test_the_convert_command_links_with_link(tmp_path, half_file):
    """``mlx-unet convert SOURCE OUT --link`` writes the tables where a copy would hold the source's
    values, and copies what it rounds; without --link, everything is copied."""
    proc = run_main(convert_command.main, str(half_file), str(tmp_path / "linked"), "--link", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert "text_encoder_2, unet, vae linked to the source)" in proc.stderr
    copied = convert(half_file, tmp_path / "copy", dtype="float32", progress=False).out_dir
    for part, cls in LINKED_PARTS:
        assert (tmp_path / "linked" / part / LINKS).is_file(), part
        _assert_same_parameters(_parameters(tmp_path / "linked" / part, cls), _parameters(copied / part, cls), part)
    proc = run_main(convert_command.main, str(half_file), str(tmp_path / "rounded"), "--link", "--dtype", "bfloat16")
    assert proc.returncode == 0 and "; vae linked to the source)" in proc.stderr, proc.stderr
    assert (tmp_path / "rounded" / "unet" / "model.safetensors").is_file()
    proc = run_main(convert_command.main, str(half_file), str(tmp_path / "plain"), "--quiet")
    assert proc.returncode == 0 and not list((tmp_path / "plain").rglob(LINKS)), proc.stderr


def test_a_linked_source_changed_since_is_refused(tmp_path, half_file, capsys):
    source = tmp_path / "refiner.safetensors"
    shutil.copy2(half_file, source)
    folder = convert(source, tmp_path / "linked", link=True).out_dir
    # Nothing copied: no size to give.
    assert f"wrote {folder} (float16, float32; text_encoder_2, unet, vae linked to the source)\n" in capsys.readouterr().err
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(WeightsError, match=r"refiner.safetensors has changed since .*linked/vae was made from it .*; "
                                           r"convert the model again from its source\.$"):
        AutoencoderKL.from_pretrained(folder / "vae")
    source.unlink()
    with pytest.raises(WeightsError, match=r"refiner.safetensors, whose tensors .* reads, cannot be read "):
        AutoencoderKL.from_pretrained(folder / "vae")
    (folder / "vae" / LINKS).write_text('{"format": "mlx-unet linked tensors 1", "dtype": "float32"}')
    with pytest.raises(WeightsError, match=r"linked_tensors.json is not a table mlx-unet wrote \('files'\); "):
        AutoencoderKL.from_pretrained(folder / "vae")
