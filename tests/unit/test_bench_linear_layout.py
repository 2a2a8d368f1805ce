"""benchmarks/bench_linear_layout.py runs (a smoke run on the tiny model; no time is checked)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+\.\d+(e[-+]\d+)?"


def test_benchmark_quick_run_times_both_layouts():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_linear_layout.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "tiny, batch 1, float32"
    assert re.fullmatch(rf" *8( +{NUMBER}){{8}}", lines[2]), lines[2]
    assert all(float(v) > 0 for v in lines[2].split()[1:4])  # both layouts timed, and their ratio
    assert float(lines[2].split()[7]) < 1e-5  # the two layouts compute the same forward
