"""Pickles: refused before torch is imported unless --allow-pickle; then a pickle that asks to run
code, or a damaged one, gets our one sentence and nothing in it runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from bad_input_helpers import assert_user_error, run_cli, tree_digest


class _RunsCode:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "src" / "model.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _RunsCode(marker)}, path)
    return path, marker


def test_refused_pickle_gets_our_sentence_and_never_runs(malicious, tmp_path):
    path, marker = malicious
    before = tree_digest(path)
    line = assert_user_error(run_cli("convert", str(path), str(tmp_path / "out"), "--allow-pickle"),
                             str(path), "is not a plain weights pickle", "nothing in it ran", "safetensors")
    assert "weights_only=False" not in line
    assert not marker.exists() and tree_digest(path) == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("damage", ["truncated", pytest.param("garbage", marks=pytest.mark.slow)])
def test_damaged_pickle_gets_one_sentence(tmp_path, damage):
    path = tmp_path / "src" / "model.pt"
    path.parent.mkdir()
    torch.save({"w": torch.ones(8, 8)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"plain text, not a pickle")
    before = tree_digest(path)
    assert_user_error(run_cli("convert", str(path), str(tmp_path / "out"), "--allow-pickle"),
                      str(path), "is not a readable PyTorch pickle (it is corrupt or truncated)")
    assert tree_digest(path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["model.CKPT", "model.Bin", "model.PT", "model.pth"])
def test_pickle_suffixes_match_in_any_case_and_torch_is_never_imported(malicious, tmp_path, name):
    path, marker = malicious
    renamed = path.with_name(name)
    path.rename(renamed)
    script = (
        "import sys\n"
        "from mlx_unet.convert import convert\n"
        "from mlx_unet.errors import ConversionError\n"
        "try:\n"
        f"    convert({str(renamed)!r}, {str(tmp_path / 'out')!r}, progress=False)\n"
        "except ConversionError as e:\n"
        "    print(e)\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    message, imported = proc.stdout.strip().splitlines()
    assert message.startswith(f"{renamed} is a PyTorch pickle") and "--allow-pickle" in message
    assert imported == "torch not imported"
    assert not marker.exists() and not (tmp_path / "out").exists()
