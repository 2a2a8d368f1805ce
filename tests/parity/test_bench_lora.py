"""benchmarks/bench_lora.py runs (a smoke run on the tiny model; no time is checked): every row of
its table, both sides, and the bit-exact removal it checks."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = ["fuse s", "fuse s, first call", "remove s", "attach live s (*)", "forward s, no LoRA",
        "forward s, live LoRA", "forward s, fused LoRA"]


@pytest.mark.slow
def test_lora_benchmark_quick_run_reports_every_row():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lora.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "LoRA: kohya, rank 4, alpha 2, on 176 attention projections" in out
    assert "16x16 latent, batch 1" in out and "remove bit-exact: yes (every parameter)" in out
    lines = {line[:26].strip(): line[26:].split() for line in out.splitlines()}
    for label in ROWS:
        ours, theirs, ratio = lines[label]
        assert float(ours) > 0 and float(theirs) > 0 and float(ratio) > 0, label
    assert lines["live overhead"][0].endswith("%") and lines["live overhead"][1].endswith("%")
    assert float(lines["live LoRA FLOPs / forward"][0].rstrip("%")) > 0  # counted from the layers
    assert "recorded" in out and "of the touched elements" in out


@pytest.mark.slow
def test_lora_benchmark_runs_ours_alone():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lora.py"), "--quick", "--no-torch",
                           "--dtype", "float16", "--batch", "2"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "ours float16" in proc.stdout and "batch 2" in proc.stdout
    fuse = next(line for line in proc.stdout.splitlines() if line.startswith("fuse s "))
    assert fuse.split()[-2:] == ["-", "-"]
    assert "remove bit-exact: yes" in proc.stdout
