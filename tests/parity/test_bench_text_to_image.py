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
    assert re.search(r"^stage +ours s +diffusers s +ratio$", out, re.M), out
    for stage in ("text encoders", "denoising s/step", "VAE decode", "total"):  # ours, diffusers, ratio
        assert re.search(rf"^{re.escape(stage)} +{NUMBER} +{NUMBER} +{NUMBER}$", out, re.M), (stage, out)
    assert re.search(rf"^peak MLX GiB +{NUMBER} +-$", out, re.M), out
    assert re.search(rf"^peak RSS GiB +{NUMBER} +{NUMBER}", out, re.M), out
    difference = re.search(r"^image max abs difference: (\S+)", out, re.M)
    assert difference and float(difference.group(1)) < 1e-3, out
