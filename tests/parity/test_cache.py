"""The conversion cache (mlx_unet.cache): a diffusers folder, a Hub snapshot or a single file is
converted once, keyed by source, revision, dtype and quantization, reused after, and never left
half-written: not by an interruption, a killed process, nor two processes converting at once."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from original_layout import SINGLE_FILE_FAMILIES, sd_single_file
from reference import torch_unet
from reference_text import torch_text_encoder
from reference_vae import torch_vae
from safetensors.torch import save_file
from test_convert import _hub_cache
from test_convert_pipeline import SMALL_TEXT, expected_listing, listing, tiny_parts, write_pipeline

import mlx_unet.cache

from mlx_unet import CLIPTextConfig, VAEConfig
from mlx_unet.cache import RECORD, SPACE_ALLOWANCE, cached_pipeline, converted_pipeline
from mlx_unet.configs.base import FORMAT_KEY
from mlx_unet.configs.quantization import Quantization
from mlx_unet.convert import convert
from mlx_unet.errors import ConversionError
from mlx_unet.linked import LINKS
from mlx_unet.safetensors_io import SafetensorsReader

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # _hub_cache's
NEW_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
SMALL_VAE = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    parts = tiny_parts(refiner=False, seed=61)
    return SimpleNamespace(parts=parts, source=write_pipeline(tmp_path_factory.mktemp("base") / "pipe", parts))


@pytest.fixture
def conversions(monkeypatch) -> list:
    """The calls the cache makes to convert(), each (source, out_dir, options)."""
    calls = []

    def counted(source, out_dir, **options):
        calls.append((source, out_dir, options))
        return convert(source, out_dir, **options)

    monkeypatch.setattr(mlx_unet.cache, "convert", counted)
    return calls


def entries(root: Path) -> list[str]:
    """The cache's entries (its dot-names are locks and partial folders)."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def files(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file's inode, modification time and bytes: what a conversion would change."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in folder.rglob("*") if p.is_file()}


def weights_bytes(folder: Path) -> int:
    """The tensor data of every weights file in a converted folder."""
    return sum(t.end - t.begin for f in folder.rglob("*.safetensors") for t in SafetensorsReader(f).tensors.values())


# ---------------------------------------------------------------------- converted once, reused


def test_converted_once_then_reused(tmp_path, base, cache, conversions):
    messages = []
    folder = cached_pipeline(base.source, dtype="float32", progress=False, log=messages.append)
    assert folder.parent == cache and folder.name.startswith("pipe-float32-")
    assert len(conversions) == 1 and messages == [f"converting {base.source} once, into the mlx-unet cache: {folder}"]
    # A local folder's float32 models in a float32 run are linked, not copied.
    assert listing(folder) == sorted([*expected_listing(base.parts, LINKS), RECORD])
    # What the cache holds is what convert() writes.
    convert(base.source, tmp_path / "direct", dtype="float32", progress=False, link=True)
    converted = files(folder)
    direct = files(tmp_path / "direct")
    assert {k: v[2] for k, v in converted.items() if k != RECORD} == {k: v[2] for k, v in direct.items()}
    record = json.loads((folder / RECORD).read_text())
    assert record["source"]["folder"] == str(base.source.resolve())
    assert record["options"]["dtype"] == "float32" and record["options"]["unet_quantization"] is None

    messages.clear()
    assert cached_pipeline(base.source, dtype="float32", progress=False, log=messages.append) == folder
    assert len(conversions) == 1 and messages == [f"using {base.source} as converted before: {folder}"]
    assert files(folder) == converted  # not a file rewritten
    assert entries(cache) == [folder.name]


# Quantized at 8 bits in groups of 64, the tiny text encoders are written dense, with a warning.
DENSE_TEXT_ENCODERS = pytest.mark.filterwarnings("ignore:the .*text encoder is written dense")


@DENSE_TEXT_ENCODERS
def test_the_key_follows_dtype_quantization_prediction_type_and_the_source(tmp_path, cache, base, conversions):
    source = shutil.copytree(base.source, tmp_path / "pipe")
    dense = cached_pipeline(source, progress=False)
    assert dense.name.startswith("pipe-float16-")
    variants = {
        "float32": cached_pipeline(source, dtype="float32", progress=False),
        "q8": cached_pipeline(source, quantize=8, progress=False),
        "q8 dense text": cached_pipeline(source, quantize=8, quantize_text_encoders="none", progress=False),
        "v": cached_pipeline(source, prediction_type="v_prediction", progress=False),
    }
    assert len(conversions) == 5 and len({dense, *variants.values()}) == 5
    assert "-q8-" in variants["q8"].name
    assert conversions[2][2]["quantize"] == Quantization(8) and conversions[3][2]["quantize_text_encoders"] is False
    scheduler = json.loads((variants["v"] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    # The same settings, spelled otherwise, are the same entry.
    assert cached_pipeline(source, quantize=Quantization.make(8, 64, "affine"), progress=False) == variants["q8"]
    assert cached_pipeline(Path(os.path.relpath(source)), dtype="float16", progress=False) == dense
    assert len(conversions) == 5

    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the file changed
    changed = cached_pipeline(source, progress=False)
    assert changed != dense and len(conversions) == 6
    assert len(entries(cache)) == 6


def test_a_converted_folder_is_used_where_it_is(tmp_path, base, cache, conversions):
    convert(base.source, tmp_path / "mlx", progress=False)
    before = files(tmp_path / "mlx")
    assert cached_pipeline(tmp_path / "mlx", dtype="bfloat16") == tmp_path / "mlx"
    with converted_pipeline(tmp_path / "mlx", use_cache=False) as folder:
        assert folder == tmp_path / "mlx"
    assert files(tmp_path / "mlx") == before and not conversions and not cache.exists()


def test_no_cache_converts_into_a_folder_removed_after(tmp_path, base, cache, conversions, monkeypatch):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temporary))
    with converted_pipeline(base.source, use_cache=False, dtype="float32", progress=False) as folder:
        assert folder.parent.parent == temporary
        assert listing(folder) == expected_listing(base.parts, LINKS)
        assert FORMAT_KEY in json.loads((folder / "model_index.json").read_text())
    assert list(temporary.iterdir()) == [] and not cache.exists() and len(conversions) == 1

    with pytest.raises(RuntimeError, match="the run failed"), converted_pipeline(base.source, use_cache=False,
                                                                                 progress=False):
        raise RuntimeError("the run failed")
    assert list(temporary.iterdir()) == []


@DENSE_TEXT_ENCODERS
@pytest.mark.parametrize("quantize", [None, 8], ids=["dense", "q8"])
def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, base, cache, conversions, monkeypatch,
                                                                     quantize):
    """The estimate is the converted weights' size: a byte less free than it (and the allowance for
    the small files) is refused, as much converts."""
    needed = weights_bytes(cached_pipeline(base.source, quantize=quantize, progress=False)) + SPACE_ALLOWANCE
    shutil.rmtree(cache)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed - 1))
    with pytest.raises(ConversionError, match=r"needs about \d+ MB but the file system of .* has \d+ MB free; free "
                                              "some space or set MLX_UNET_CACHE to a folder on a larger disk"):
        cached_pipeline(base.source, quantize=quantize, progress=False)
    assert not cache.exists() and len(conversions) == 1
    with pytest.raises(ConversionError, match="set TMPDIR to a folder on a larger disk"), \
            converted_pipeline(base.source, use_cache=False, quantize=quantize, progress=False):
        pass
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed))
    cached_pipeline(base.source, quantize=quantize, progress=False)
    assert len(conversions) == 2


def test_a_single_file_keyed_by_its_resolved_path_size_and_time(tmp_path, cache, conversions):
    config = SINGLE_FILE_FAMILIES["sd15"]
    unet, vae = torch_unet(config, seed=93), torch_vae(VAEConfig.from_preset("sdxl", **SMALL_VAE), seed=94)
    clip = torch_text_encoder(CLIPTextConfig.from_preset("sdxl-clip-l", **SMALL_TEXT), seed=95)
    path = tmp_path / "models" / "sd15.safetensors"
    path.parent.mkdir()
    tensors = sd_single_file(unet.state_dict(), config, clip.state_dict(), vae.state_dict(), open_clip=False)
    save_file(tensors, str(path))
    folder = cached_pipeline(path, dtype="float32", progress=False)
    assert folder.name.startswith("sd15-float32-")
    stat = path.stat()
    record = json.loads((folder / RECORD).read_text())
    assert record["source"] == {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    assert {"model_index.json", "unet", "text_encoder", "vae", "tokenizer", "scheduler"} <= set(os.listdir(folder))
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    assert cached_pipeline(link, dtype="float32", progress=False) == folder and len(conversions) == 1

    path.write_bytes(path.read_bytes())  # the same bytes written again, a second later: a file that may have changed
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # (whatever the file system's time resolution)
    assert cached_pipeline(path, dtype="float32", progress=False) != folder and len(conversions) == 2


# ---------------------------------------------------------------------- the Hub


def _snapshot_files(source: Path) -> dict[str, Path]:
    return {str(p.relative_to(source)): p for p in source.rglob("*") if p.is_file()}


def test_hub_repo_keyed_by_the_commit_its_revision_is_at(tmp_path, base, cache, conversions, monkeypatch):
    hub = _hub_cache(tmp_path / "hub", "someone/tiny-sdxl", _snapshot_files(base.source))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    first = cached_pipeline("someone/tiny-sdxl", dtype="float32", progress=False)
    assert first.name.startswith("someone--tiny-sdxl-float32-")
    assert json.loads((first / RECORD).read_text())["source"] == {"hub": "someone/tiny-sdxl", "commit": COMMIT}
    assert conversions[0][2]["revision"] == COMMIT  # what is converted is the commit the key names
    assert cached_pipeline("someone/tiny-sdxl", dtype="float32", progress=False) == first and len(conversions) == 1

    repo = hub / "models--someone--tiny-sdxl"  # main moves to a new commit
    shutil.copytree(repo / "snapshots" / COMMIT, repo / "snapshots" / NEW_COMMIT, symlinks=True)
    (repo / "refs" / "main").write_text(NEW_COMMIT)
    moved = cached_pipeline("someone/tiny-sdxl", dtype="float32", progress=False)
    assert moved != first and len(conversions) == 2
    assert cached_pipeline("someone/tiny-sdxl", revision=COMMIT, dtype="float32", progress=False) == first
    assert len(conversions) == 2

    with pytest.raises(ConversionError, match="someone/other .*is not in the Hugging Face cache"):
        cached_pipeline("someone/other", progress=False)
    assert len(entries(cache)) == 2


def test_hub_repo_online_resolves_the_revision_once(tmp_path, base, cache, conversions, monkeypatch):
    """The online path with huggingface_hub's calls stood in for (no network here)."""
    listed = sorted(_snapshot_files(base.source))
    revisions = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        revisions.append(revision)
        return str(base.source)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id, revision=None: SimpleNamespace(sha=NEW_COMMIT))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: listed)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder = cached_pipeline("org/tiny", revision="v1", progress=False)
    record = json.loads((folder / RECORD).read_text())
    assert record["source"] == {"hub": "org/tiny", "commit": NEW_COMMIT} and record["requested_revision"] == "v1"
    assert revisions and set(revisions) == {NEW_COMMIT}


# ---------------------------------------------------------------------- interruptions and races

# Converts into the cache; the first model's weights (copied or linked) written, it waits (for
# RESUME, a file, to appear) so that the test signals it, or starts a second process, while the
# conversion is half done.
CHILD = """
import os, sys, time
from pathlib import Path
import mlx_unet.convert.writer as writer
from mlx_unet.cache import cached_pipeline

resume = Path(os.environ["RESUME"])
def then_wait(write):
    def write_then_wait(path, *args, **kwargs):
        write(path, *args, **kwargs)
        if not hasattr(then_wait, "waited"):
            then_wait.waited = True
            print("written", flush=True)
            deadline = time.monotonic() + 60
            while not resume.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
    return write_then_wait
writer.write_safetensors, writer.write_links = then_wait(writer.write_safetensors), then_wait(writer.write_links)
print(cached_pipeline(sys.argv[1], dtype="float32", progress=False, log=lambda m: print(m, flush=True)), flush=True)
"""


def _child(source: Path, cache: Path, resume: Path) -> subprocess.Popen:
    # SIGINT at its default (a shell's background job inherits it ignored; Python then raises no
    # KeyboardInterrupt).
    env = {**os.environ, "MLX_UNET_CACHE": str(cache), "RESUME": str(resume)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _read_until(proc: subprocess.Popen, text: str) -> list[str]:
    lines = []
    while not lines or text not in lines[-1]:
        line = proc.stdout.readline()
        assert line, (lines, proc.stderr.read() if proc.poll() is not None else "")
        lines.append(line.strip())
    return lines


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_conversion_leaves_no_entry(tmp_path, base, cache, conversions, signum):
    proc = _child(base.source, cache, tmp_path / "never")
    _read_until(proc, "written")
    proc.send_signal(signum)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert entries(cache) == []  # no folder that a later call would take as converted
    partial = [p.name for p in cache.iterdir() if p.is_dir()]
    if signum == signal.SIGINT:
        assert partial == []  # cleaned up on the way out
    else:
        assert len(partial) == 1 and partial[0].endswith(".partial")  # a killed process cleans nothing

    folder = cached_pipeline(base.source, dtype="float32", progress=False)
    assert len(conversions) == 1 and listing(folder) == sorted([*expected_listing(base.parts, LINKS), RECORD])
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [folder.name]  # the killed one's partial folder is gone


def test_two_processes_convert_once(tmp_path, base, cache):
    resume = tmp_path / "resume"
    first = _child(base.source, cache, resume)
    _read_until(first, "written")
    second = _child(base.source, cache, resume)
    _read_until(second, f"waiting for another mlx-unet converting {base.source}")
    resume.touch()
    out_first, err_first = first.communicate(timeout=120)
    out_second, err_second = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, err_first + err_second
    folder = out_first.strip().splitlines()[-1]
    assert out_second.strip().splitlines() == [f"using {base.source} as converted before: {folder}", folder]
    assert entries(cache) == [Path(folder).name]
