"""benchmarks/bench_unet.py runs (a smoke run on the tiny model; no time is checked), and its FLOP
count is torch's."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from reference import TIME_IDS, make_inputs, mlx_from_torch, run_mlx, run_torch, tiny_config, torch_unet
from torch.utils.flop_counter import FlopCounterMode

from mlx_unet import cpu
from mlx_unet.schedulers import SAMPLERS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_quick_run_reports_every_column():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_unet.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "sgemm: 512x512 float32 matmul" in proc.stdout and "diffusers in its own process" in proc.stdout
    header, row = lines[-2].split(), lines[-1].split()
    assert header[:3] == ["latent", "dtype", "ours"] and row[:2] == ["16", "float32"]
    assert len(row) == 14 and float(row[5]) > 0  # GFLOP counted from the model's layers
    assert float(row[7]) > 0 and row[8].endswith("%")  # sgemm measured between our forwards
    assert float(row[9]) > 0 and float(row[10]) > 0  # diffusers' rate, torch's sgemm in its process


@pytest.mark.slow
def test_benchmark_runs_compiled_and_in_low_memory_mode():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_unet.py"), "--quick", "--compile",
                           "--low-memory", "--no-torch"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "compiled, low-memory" in proc.stdout
    row = proc.stdout.strip().splitlines()[-1].split()
    assert row[:2] == ["16", "float32"] and row[3] == "-" and float(row[-1]) > 0


@pytest.mark.slow
def test_benchmark_runs_half_precision_widened_for_the_run_or_not():
    for widen in ([], ["--widen"]):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_unet.py"), "--quick", "--no-torch",
                               "--dtype", "float16", *widen], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert ("half precision widened for the run" in proc.stdout) == bool(widen)
        row = proc.stdout.strip().splitlines()[-1].split()
        assert row[:2] == ["16", "float16"] and float(row[2]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl-base", "sd15"])
def test_flop_count_equals_torchs_flop_counter(family, monkeypatch):
    """The benchmark's count (every Linear, Conv2d and attention call of our forward, traced on
    the plain model, as the benchmark does) equals what torch's FlopCounterMode counts over
    diffusers' forward with its plain (bmm) attention."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_unet

    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    config = tiny_config(family)
    reference = torch_unet(config, seed=0)
    ours = mlx_from_torch(reference, config)
    reference.set_attn_processor(AttnProcessor())
    inputs = make_inputs(config, 2, 40, 36, n_time_ids=TIME_IDS.get(family))
    with bench_unet.counting_flops() as counted:
        run_mlx(ours, inputs)
    torch_counter = FlopCounterMode(display=False)
    with torch_counter, torch.no_grad():
        run_torch(reference, inputs)
    assert counted[0] == torch_counter.get_total_flops() > 0


@pytest.mark.slow
def test_sampler_errors_lists_every_sampler_within_its_bound():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampler_errors.py"), "--steps", "4"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert {row[0] for row in rows} == set(SAMPLERS)
    assert all(float(row[-1]) <= 1e-4 for row in rows)


@pytest.mark.slow  # the benchmarks' harness, as their smoke runs above
def test_reference_process_loads_neither_mlx_nor_our_blas():
    """diffusers is timed in a process where torch's BLAS calls reach torch's own library: one that
    never imported MLX or mlx_unet, whose OpenBLAS, loaded globally, would take them over."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import torch_reference, diffusers, torch; "
            "print(any(m.split('.')[0] in ('mlx', 'mlx_unet') for m in sys.modules)); "
            "print('/libopenblas' in open('/proc/self/maps').read())")  # (numpy's is libscipy_openblas)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["False", "False"]
    # What the check would see in a process that imported mlx_unet first.
    after_ours = subprocess.run([sys.executable, "-c", "import mlx_unet; " + code], capture_output=True, text=True,
                                cwd=ROOT)
    assert after_ours.stdout.split("\n")[:2] == ["True", str(cpu.blas.loaded is not None)]


@pytest.mark.slow
def test_attention_benchmark_times_torchs_attention_beside_ours():
    """benchmarks/bench_attention.py's torch column: torch's attention timed in its own process."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[1].startswith("torch in its own process, ") and lines[1].endswith(" GFLOP/s"), lines[1]
    assert lines[2].endswith("torch s ours / torch"), lines[2]
    row = lines[3][56:].split()
    assert lines[3].startswith("small (2x2x300x320, 32)") and len(row) == 8, lines[3]
    assert float(row[6]) > 0 and float(row[7]) > 0  # torch's seconds, and ours over them
