"""benchmarks/bench_text_to_image.py runs (a smoke run on tiny components; no time is checked)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"(\d+\.\d+)"


@pytest.mark.slow
def test_benchmark_quick_run_reports_every_stage_and_the_same_image():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_text_to_image.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^stage +ours s +diffusers s +ratio +ours MLX GiB +ours RSS GiB +diffusers RSS GiB$", out, re.M), out
    for stage in ("load", "text encoders", "denoising", "VAE decode", "tiny VAE decode"):
        # seconds: ours, diffusers, ratio; peak memory: ours MLX and RSS, diffusers' RSS
        assert re.search(rf"^{re.escape(stage)} +{NUMBER}( +{NUMBER}){{5}}$", out, re.M), (stage, out)
    for stage in ("step", "total"):
        assert re.search(rf"^{stage} +{NUMBER} +{NUMBER} +{NUMBER}$", out, re.M), (stage, out)
    # ours alone: the UNet loads when the call first needs it (its seconds also count in "load")
    assert re.search(rf"^UNet load +{NUMBER} +- +- +{NUMBER} +{NUMBER}$", out, re.M), out
    assert re.search(rf"^peak \(run\) +{NUMBER} +{NUMBER} +{NUMBER}$", out, re.M), out
    for name in ("image", "tiny image"):
        difference = re.search(rf"^{name} max abs difference: (\S+)", out, re.M)
        assert difference and float(difference.group(1)) < 1e-3, out
