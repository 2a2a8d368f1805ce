"""benchmarks/bench_quantize.py runs (a smoke run on tiny components; no figure is checked
beyond being there and finite): every table of sensitivity, fidelity and memory."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quantize_benchmark_quick_run_prints_every_table(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quantize.py"), "all", "--quick",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for group in ("attention projections", "feed-forward", "proj_in/out", "time/added embeddings", "convolutions",
                  "text-encoder layers"):
        assert f"| {group}" in out, group
    assert re.search(r"\| 8-bit \| \d\.\d\de-\d\d \| \d\.\d\de-\d\d \| \d\.\d\de-\d\d \|", out)
    assert re.search(r"\| 4-bit \| \d\.\d\de-\d\d \| \d\.\d\de-\d\d \| \d\.\d\de-\d\d \|", out)
    psnr = [float(v) for v in re.findall(r"\| (\d+\.\d) dB \|", out)]
    assert len(psnr) == 3 and all(0 < v < 100 for v in psnr)
    assert "| UNet 4-bit affine, groups of 64 | " in out and "peak of the whole run, decode included (MLX)" in out
