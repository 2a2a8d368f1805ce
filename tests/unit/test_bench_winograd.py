"""benchmarks/bench_winograd.py runs (a smoke run on small shapes and tiny models; no time is checked)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+\.\d+(e[-+]\d+)?"


def test_benchmark_quick_run_times_both_ways():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_winograd.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "float32, CPU kernels; GFLOP/s as direct convolutions"
    rows = {line[:32].strip(): line[32:].split() for line in lines[2:]}
    assert list(rows) == ["conv 2x32x32 128->128", "VAE decode 64 px", "VAE encode 64 px", "UNet 8x8 batch 2"]
    for name, values in rows.items():
        assert len(values) == 7 and all(re.fullmatch(NUMBER, v) for v in values), (name, values)
        assert all(float(v) > 0 for v in values[:5]), (name, values)  # both ways timed, ratio, rates
    # The layer runs Winograd's products one way and per-tap products the other: the results
    # differ by float32 rounding only, and not at all where Winograd does not apply.
    assert 0 < float(rows["conv 2x32x32 128->128"][6]) < 1e-5
    assert float(rows["UNet 8x8 batch 2"][6]) == 0


def test_turns_and_repeats_must_be_counts():
    for bench in ("bench_winograd.py", "bench_linear_layout.py"):
        for option, value in (("--rounds", "0"), ("--repeats", "-1")):
            proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / bench), option, value],
                                  capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert proc.returncode == 2 and f"{value} is not a whole number of 1 or more" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
