"""benchmarks/bench_unet.py runs (a smoke run on the tiny model; no time is checked)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_quick_run_reports_every_column():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_unet.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "sgemm: the better of MLX's and torch's 512x512" in proc.stdout
    header, row = lines[-2].split(), lines[-1].split()
    assert header[:3] == ["latent", "dtype", "ours"] and row[:2] == ["16", "float32"]
    assert len(row) == 12 and float(row[5]) > 0  # GFLOP counted from the model's layers
    assert float(row[7]) > 0 and row[8].endswith("%")  # sgemm measured between our forwards


def test_benchmark_runs_compiled_and_in_low_memory_mode():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_unet.py"), "--quick", "--compile",
                           "--low-memory", "--no-torch"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "compiled, low-memory" in proc.stdout
    row = proc.stdout.strip().splitlines()[-1].split()
    assert row[:2] == ["16", "float32"] and row[3] == "-" and float(row[-1]) > 0
