"""benchmarks/bench_load.py runs (a smoke run on the demo pipeline; no time is checked)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+\.\d+"


def test_benchmark_quick_run_reports_every_part():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_load.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[1].split() == ["part", "GB", "read", "s", "GB/s", "load", "s", "load/read", "cached", "read", "s"]
    assert [line.split()[0] for line in lines[2:]] == ["unet", "text_encoder", "text_encoder_2", "vae"]
    for line in lines[2:]:
        assert re.fullmatch(rf"\S+( +{NUMBER}){{6}}", line), line
        assert float(line.split()[4]) > 0  # a load was timed


def test_model_or_quick_is_required():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_load.py")], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "give --model DIR, or --quick" in proc.stderr
