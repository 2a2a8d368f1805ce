"""Class 6: warnings always reach the user (under --quiet and progress=False too); class 8:
interrupted and killed runs leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from bad_input_helpers import PROMPT, ROOT, SIZE, assert_user_error, run_cli, write_diffusers_unet, write_single_file

from mlx_unet import UNetConfig
from mlx_unet.convert import convert
from mlx_unet.errors import MlxUnetWarning, NonFiniteWarning

TINY = UNetConfig.from_preset("tiny")


def test_nan_weights_warn_in_the_api_without_progress(tmp_path):
    source = write_diffusers_unet(tmp_path / "unet", TINY, nan=True)
    with pytest.warns(NonFiniteWarning, match=r"1 tensors hold NaN or inf values .*conv_in\.bias"):
        convert(source, tmp_path / "out", progress=False)


def test_warnings_reach_stderr_under_quiet(tmp_path):
    source = write_diffusers_unet(tmp_path / "unet", TINY, nan=True)
    proc = run_cli("convert", str(source), str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr.startswith("warning: 1 tensors hold NaN or inf") and len(proc.stderr.splitlines()) == 1

    single = write_single_file(tmp_path / "unet.safetensors", TINY)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY.library_dict()))
    proc = run_cli("convert", str(single), str(tmp_path / "out-ema"), "--ema", "--quiet", "--config", str(config))
    assert proc.returncode == 0
    assert proc.stderr == "warning: --ema given but the file has no EMA weights; converting the regular weights\n"
    with pytest.warns(MlxUnetWarning, match="--ema given but the file has no EMA weights"):
        convert(single, tmp_path / "out-ema-api", ema=True, config=config, progress=False)


def _big_unet(tmp_path: Path) -> Path:
    # About 90 MB in float32: long enough to write that a signal lands while the folder is partial.
    config = UNetConfig.from_preset("tiny", block_out_channels=[192, 384, 384], attention_head_dim=[2, 4, 4])
    return write_diffusers_unet(tmp_path / "big", config)


# The mlx-unet command, its conversion held after the first tensor is written (for a minute, or
# until a signal ends it): a signal then lands mid-write however slowly the test polls.
HELD_CONVERSION = """
import sys, time
import mlx_unet.convert.writer as writer
from mlx_unet.cli import main

write = writer.write_safetensors
def held(path, specs, metadata=None, on_tensor=None):
    def written(spec):
        on_tensor(spec)
        time.sleep(60)
    write(path, specs, metadata, on_tensor=written)
writer.write_safetensors = held
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_conversion_killed_mid_write_leaves_nothing(tmp_path, signum):
    source = write_diffusers_unet(tmp_path / "unet", TINY)
    out = tmp_path / "new" / "deeper" / "out"  # its parents too are made by the conversion
    # SIGINT at its default in the child: a shell runs background jobs with it ignored (inherited),
    # and Python then installs no KeyboardInterrupt handler, as for any command started so.
    proc = subprocess.Popen([sys.executable, "-c", HELD_CONVERSION, "convert", str(source), str(out), "--dtype",
                             "float32", "--quiet"], stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    # Signalled once the weights have started to be written: the glob of a missing folder is empty.
    while not any(f.stat().st_size for f in out.parent.glob(".out.*.partial/*.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before it was signalled"
        time.sleep(0.002)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines() == ["interrupted; nothing was written."] and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # no partial folder, and no parent it created


def test_a_failed_conversion_removes_the_parents_it_made(tmp_path):
    source = _big_unet(tmp_path)
    out = tmp_path / "made" / "out"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails as on a full disk
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    proc = subprocess.run([sys.executable, "-m", "mlx_unet", "convert", str(source), str(out), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, preexec_fn=small_files, timeout=120)
    assert_user_error(proc, "File too large", "model.safetensors")
    assert not (tmp_path / "made").exists()


def test_a_generation_interrupted_mid_run_writes_nothing(tiny_pipeline, tmp_path):
    out = tmp_path / "out.png"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_unet", "generate", PROMPT, "--model", str(tiny_pipeline), "-o",
                             str(out), "--steps", "500", "--height", str(SIZE), "--width", str(SIZE)],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen = ""
    while "1/500" not in seen:  # the first step is done: the run is under way
        chunk = proc.stderr.read(1)
        assert chunk, seen
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted; nothing was written."
    assert list(tmp_path.iterdir()) == []


def test_the_api_installs_no_signal_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(write_diffusers_unet(tmp_path / "unet", TINY), tmp_path / "out", progress=False)
    assert signal.getsignal(signal.SIGTERM) is before
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
