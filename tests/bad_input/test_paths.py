"""Class 5: a path is a path. A mistyped local path, a dangling symlink or a symlink loop is
reported missing locally at once, never looked up on the Hub."""

from __future__ import annotations

import os
import time

import huggingface_hub
import pytest
from bad_input_helpers import assert_user_error, run_cli, run_in_process

from mlx_unet.convert.hub import is_repo_id, looks_local

# A Hub lookup would go here and fail slowly: a test that passes through it shows in the time
# and in the message (which would then speak of the Hub).
NO_NETWORK = {"HF_ENDPOINT": "http://10.255.255.1:9", "HF_HUB_ETAG_TIMEOUT": "30"}


def _cases(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.safetensors")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    return {
        "weights suffix": ("models/sdxl.safetensors", "the source models/sdxl.safetensors does not exist"),
        "checkpoint suffix": ("stabilityai/sd_xl_base_1.0.CKPT", "does not exist"),
        "relative": ("./models/sdxl", "the source ./models/sdxl does not exist"),
        "absolute": (str(tmp_path / "nope"), f"the source {tmp_path / 'nope'} does not exist"),
        "dangling link": (str(tmp_path / "dangling"), "is a symbolic link to"),
        "link loop": (str(tmp_path / "loop-a"), "does not exist or loops back"),
    }


@pytest.mark.parametrize("case", ["weights suffix", "checkpoint suffix", "relative", "absolute", "dangling link",
                                  "link loop"])
def test_mistyped_paths_are_reported_missing_at_once(tmp_path, monkeypatch, case):
    """One case as a process whose Hub would time out; the rest in this process, where a Hub
    lookup fails the test."""
    def looked_up(*args, **kwargs):
        raise AssertionError(f"looked up on the Hub: {args}")

    for name in ("snapshot_download", "list_repo_files", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, looked_up)
    source, expected = _cases(tmp_path)[case]
    began = time.perf_counter()
    if case == "weights suffix":
        proc = run_cli("convert", source, str(tmp_path / "out"), env={**os.environ, **NO_NETWORK})
    else:
        proc = run_in_process("convert", source, str(tmp_path / "out"))
    assert_user_error(proc, expected)
    assert "Hub" not in proc.stderr
    assert time.perf_counter() - began < 15  # no network timeout
    assert not (tmp_path / "out").exists()


def test_tokenizers_path_is_local_too(tmp_path):
    source = tmp_path / "sd.safetensors"
    source.write_bytes(b"\0" * 16)
    proc = run_cli("convert", str(source), str(tmp_path / "out"), "--tokenizers", "./tokenizers",
                   env={**os.environ, **NO_NETWORK})
    # Either the file is refused first or the missing --tokenizers folder is named: never the Hub.
    assert proc.returncode == 2 and "Hub" not in proc.stderr and "Traceback" not in proc.stderr


def test_repo_ids_are_still_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for repo in ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/sdxl-turbo", "runwayml/stable-diffusion-v1-5"):
        assert is_repo_id(repo) and not looks_local(repo)
    for path in ("a/b.safetensors", "a/b.JSON", "./a/b", "/a/b", "~/a"):
        assert not is_repo_id(path) and looks_local(path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").symlink_to(tmp_path / "missing")  # a dangling link shaped like a repo id
    assert looks_local("owner/name") and not is_repo_id("owner/name")
