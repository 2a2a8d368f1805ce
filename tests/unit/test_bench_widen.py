"""benchmarks/bench_widen.py runs (a smoke run on the demo pipeline; no time is checked)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"-?\d+\.\d+"


def test_benchmark_quick_run_reports_forwards_and_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_widen.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[1].split() == ["latent", "per", "call", "s", "held", "s", "ratio", "saved", "s", "widen", "s",
                                "narrow", "s"]
    assert re.fullmatch(rf" +8( +{NUMBER}){{6}}", lines[2]), lines[2]
    assert lines[3] == "runs at 64 px, UNet kept:"
    # Two steps are too few to pay for widening: the default does not widen.
    assert re.fullmatch(rf" +2( +{NUMBER}){{5}} +no( +{NUMBER}){{2}}", lines[5]), lines[5]


def test_model_or_quick_is_required():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_widen.py")], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "give --model DIR, or --quick" in proc.stderr
