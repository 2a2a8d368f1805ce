"""benchmarks/bench_vae.py runs (a smoke run on small VAEs of both kinds, AutoencoderKL and
AutoencoderTiny; no time is checked) and its outputs agree with diffusers'."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("vae", ["kl", "tiny"])
@pytest.mark.parametrize("kernels", ["1", "0"], ids=["cpu-kernels", "plain-mlx"])
def test_benchmark_quick_run_reports_every_column(kernels, vae, monkeypatch):
    monkeypatch.setenv("MLX_UNET_CPU_KERNELS", kernels)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vae.py"), "--quick", "--vae", vae],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert ("CPU kernels" if kernels == "1" else "plain MLX") in proc.stdout
    assert lines[0].startswith("AutoencoderKL (tiny)" if vae == "kl" else "AutoencoderTiny (tiny)")
    header = lines[-3].split()
    assert header[:4] == ["what", "px", "ours", "s"] and header[-2:] == ["|diff|", "relative"]
    rows = [line.split() for line in lines[-2:]]
    assert [row[:2] for row in rows] == [["decode", "64"], ["encode", "64"]]
    for row in rows:
        assert len(row) == 12 and float(row[2]) > 0 and float(row[3]) > 0
        assert float(row[5]) > 0 and float(row[7]) > 0  # GFLOP counted, MLX's peak measured
        assert float(row[11]) <= 1e-4  # the outputs agree with diffusers'
