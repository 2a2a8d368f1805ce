"""benchmarks/bench_sdcpp.py runs (a smoke run on tiny components; no time is checked): it writes
the single file, runs ``mlx-unet generate`` on it from an empty cache and from the cached
conversion, runs the ``sd`` binary it is given with the same settings, and reads each log. A
stand-in ``sd`` that logs as stable-diffusion.cpp does checks the arguments and the parsing."""

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

FAKE_SD = """#!{python}
import sys
args = sys.argv[1:]
given = dict(zip(args[::2], args[1::2]))
assert given["--steps"] == "4" and given["--cfg-scale"] == "5.0" and given["--sampling-method"] == "euler", args
assert given["-H"] == given["-W"] == "64" and given["-t"] == "2" and given["-m"].endswith(".safetensors"), args
open(given["-o"], "wb").write(b"png")
print("[INFO ] model.cpp:993 - loading tensors completed, taking 1.25s (process: 0.00s, read: 1.00s)")
print("\\r  |====>        | 2/4 - 9.00s/it\\r  |==========| 4/4 - 9.00s/it")
print("[INFO ] stable-diffusion.cpp:3432 - sampling completed, taking 36.00s")
"""


@pytest.mark.slow
def test_benchmark_quick_run_reports_both_commands(tmp_path):
    sd = tmp_path / "sd"
    sd.write_text(FAKE_SD.format(python=sys.executable))
    sd.chmod(sd.stat().st_mode | stat.S_IXUSR)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sdcpp.py"), "--quick", "--workdir",
                           str(tmp_path / "work"), "--dtype", "float32", "--sd", str(sd), "--threads", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "work" / "small-sdxl-single-file-float16.safetensors").is_file()
    with Image.open(tmp_path / "work" / "bench-sdcpp" / "ours-float32.png") as image:
        assert image.size == (64, 64)
    lines = proc.stdout.strip().splitlines()
    assert "each command after 0 s of quiet, when fresh memory cost" in lines[-5]  # (--quick settles 0 s)
    assert lines[-4].split() == ["command", "total", "s", "load", "s", "step", "s", "peak", "RSS", "GiB", "faulted",
                                 "GiB"]
    rows = {line[:28].strip(): line[28:].split() for line in lines[-3:]}
    assert list(rows) == ["mlx-unet float32, first", "mlx-unet float32, cached", "sd.cpp f16"]
    for name, values in list(rows.items())[:2]:  # (the stand-in takes no time or memory)
        assert all(float(v) > 0 for v in values), name
    assert rows["sd.cpp f16"][1:3] == ["1.2", "9.00"]  # its load and sampling time over 4 steps
    # The stand-in's own peak (a small Python), not the benchmark's after it built the pipeline
    # with torch: a child's peak RSS starts at its parent's.
    assert float(rows["sd.cpp f16"][3]) < 0.1


def test_sd_must_be_an_executable(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sdcpp.py"), "--workdir", str(tmp_path),
                           "--sd", str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "is not an executable file" in proc.stderr


@pytest.mark.parametrize("settle", ["-1", "nan", "inf"])
def test_settle_must_be_seconds(tmp_path, settle):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sdcpp.py"), "--workdir", str(tmp_path),
                           "--settle", settle], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "is not a number of seconds" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing built or written
