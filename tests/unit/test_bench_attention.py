"""benchmarks/bench_attention.py runs (a smoke run on a small shape and the tiny UNet, without torch here; no
time is checked)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+\.\d+(e[-+]\d+)?"


@pytest.mark.slow
def test_benchmark_quick_run_times_both_ways():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--quick", "--what",
                           "shapes", "unet", "--no-torch"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"float32, CPU kernels, \d+ BLAS threads; GFLOP/s of the products", lines[0]), lines[0]
    rows = {line[:56].strip(): line[56:].split() for line in lines[2:]}
    assert list(rows) == ["small (2x2x300x320, 32)", "UNet 8x8 batch 2"]
    for name, values in rows.items():
        assert len(values) == 6 and all(re.fullmatch(NUMBER, v) for v in values), (name, values)
        assert all(float(v) > 0 for v in values[:5]), (name, values)  # both ways timed, ratio, rates
        assert float(values[5]) == 0, (name, values)  # the same products and passes: the same values
