"""Class 2: output is checked before the work and written in one piece: a path that cannot be
written is refused before any model loads; each image is written whole or not at all, and a batch
that fails part way says which of its images were written; files and folders get ordinary
permissions."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from bad_input_helpers import PROMPT, ROOT, RUN, SIZE, assert_user_error, run_cli, run_in_process, tree_digest, \
    write_diffusers_unet
from PIL import Image

from mlx_unet import InputError, UNetConfig, cli
from mlx_unet.pipelines.images import check_writable, output_paths, write_png


def _generate(pipeline: Path, out: Path, *flags: str, run=run_cli, **kwargs) -> subprocess.CompletedProcess:
    """``generate`` into ``out`` (``run``: in a process, or ``run_in_process``)."""
    return run("generate", PROMPT, "--model", str(pipeline), "-o", str(out), *RUN, *flags, **kwargs)


@pytest.mark.parametrize("case", ["folder", "missing folder", "not png", "parent is a file"])
def test_unwritable_outputs_are_refused_before_loading(tiny_pipeline, tmp_path, case):
    out, expected = {
        "folder": (tmp_path / "taken.png", "is a folder"),
        "missing folder": (tmp_path / "no" / "out.png", "does not exist; create it first"),
        "not png": (tmp_path / "out.jpg", "must be a .png file"),
        "parent is a file": (tmp_path / "file" / "out.png", "does not exist; create it first"),
    }[case]
    if case == "folder":
        out.mkdir()
    if case == "parent is a file":
        (tmp_path / "file").write_text("not a folder")
    before = tree_digest(tmp_path)
    began = time.perf_counter()
    # One case as a process, the rest in this one.
    run = run_cli if case == "folder" else run_in_process
    assert_user_error(_generate(tiny_pipeline, out, "-n", "3", run=run), str(out.parent), expected)
    assert time.perf_counter() - began < 20
    assert tree_digest(tmp_path) == before  # nothing written, nothing removed


def test_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    # Root (as tests here run) writes into any folder, so the probe's refusal is simulated: what
    # is checked is that the folder is probed by a write and the refusal names it.
    def read_only(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(InputError, match=f"cannot write into {tmp_path} \\(Permission denied\\); choose a writable"):
        check_writable(output_paths(tmp_path / "x.png", 1), SIZE, SIZE)


def _file_size_limit(limit: int):
    def apply():
        # A file past RLIMIT_FSIZE fails as a full disk does (the write raises), once SIGXFSZ,
        # which would kill the process, is ignored.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_batch_that_cannot_be_written_writes_nothing(tiny_pipeline, tmp_path):
    # 1 KB: every image fails (the first write too), after the whole run: the check before the
    # run cannot see a quota, so the batch must still end clean.
    out = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "-m", "mlx_unet", "generate", PROMPT, "--model", str(tiny_pipeline),
                           "-o", str(out), *RUN, "-n", "3"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          preexec_fn=_file_size_limit(1024))
    assert_user_error(proc, f"File too large: {out}; written before it: nothing")
    assert list(tmp_path.iterdir()) == []  # no image, no temporary file


def test_a_failed_png_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    path.write_bytes(b"an older image")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left on device") as failed:
        write_png(path, np.zeros((8, 8, 3), np.uint8), {"parameters": "a prompt"})
    assert failed.value.filename == str(path)  # named after the image, not its temporary file
    assert sorted(tmp_path.iterdir()) == [path] and path.read_bytes() == b"an older image"


def test_a_batch_failing_part_way_names_the_images_written(tiny_pipeline, tmp_path, monkeypatch, capsys):
    import mlx_unet.cli.generate as generate

    calls = []

    def third_fails(path, image, text=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        write_png(path, image, text)

    monkeypatch.setattr(generate, "write_png", third_fails)
    out = tmp_path / "x.png"
    paths = output_paths(out, 3)
    assert [p.name for p in paths] == ["x.png", "x-1.png", "x-2.png"]
    code = cli.main(["generate", PROMPT, "--model", str(tiny_pipeline), "-o", str(out), *RUN, "-n", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: No space left on device: {paths[2]}; written before it: {paths[0]}, {paths[1]}"]
    assert set(tmp_path.iterdir()) == set(paths[:2])  # whole images, no temporary file
    for path in paths[:2]:
        with Image.open(path) as png:
            png.load()
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_too_little_free_space_is_refused(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(InputError, match="has 0.0 MiB free and the images need up to 0.1 MiB"):
        check_writable(output_paths(tmp_path / "x.png", 2), SIZE * 2, SIZE * 2)


def test_images_and_converted_folders_get_ordinary_permissions(tiny_pipeline, tmp_path):
    out = tmp_path / "out.png"
    previous = os.umask(0o022)
    try:
        assert _generate(tiny_pipeline, out).returncode == 0
        source = write_diffusers_unet(tmp_path / "source", UNetConfig.from_preset("tiny"))
        assert run_cli("convert", str(source), str(tmp_path / "converted"), "--quiet").returncode == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    for path in [tmp_path / "converted", *(tmp_path / "converted").rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
