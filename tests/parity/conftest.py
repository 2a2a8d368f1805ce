"""The parity tier: torch's threads, and memory handed back after the full-size tests."""

import gc
import os

import mlx.core as mx
import pytest
import torch
from reference import release_memory

import mlx_unet

# This worker's share of the cores (tests/conftest.py), for torch as for OpenBLAS.
WORKER_THREADS = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count() or 1)
torch.set_num_threads(WORKER_THREADS)


def _set_threads(count: int) -> None:
    torch.set_num_threads(count)
    mlx_unet.cpu.blas.set_threads(count)


@pytest.fixture(autouse=True)
def _all_cores_for_full_size(request):
    """The full-size tests run one at a time (``xdist_group("full_size")``) and for minutes, much
    of it after the other worker has run out of tests: they take every core."""
    marker = request.node.get_closest_marker("xdist_group")
    full_size = marker is not None and marker.args[:1] == ("full_size",)
    if full_size:
        _set_threads(os.cpu_count() or 1)
    yield
    if full_size:
        _set_threads(WORKER_THREADS)

# torch, diffusers and transformers create millions of long-lived objects at import; frozen, they
# are no longer scanned by every gc.collect() (0.25 s each otherwise, after every test).
gc.freeze()

_RELEASE_ABOVE_BYTES = 2 * 2**30


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: always release


@pytest.fixture(autouse=True)
def _release_memory_after_each_test():
    """Full-size tests hold 10 GB models: hand freed memory back before the next test. Small
    tests leave little behind, and a collection after each would cost more than they do."""
    yield
    resident = _resident_bytes()
    held_by_mlx = mx.get_active_memory() + mx.get_cache_memory()
    if resident is None or max(resident, held_by_mlx) > _RELEASE_ABOVE_BYTES:
        release_memory()


@pytest.fixture
def torch_math_correctly_rounded(monkeypatch):
    """diffusers' schedulers take float32 roots, logarithms and exponentials with torch, whose
    results depend on the CPU: on an AMD EPYC, torch 2.13's float32 sqrt of 2.1215832 is 1.4565656
    where the correctly rounded root (numpy's, ours) is 1.4565655, an ulp off in 16% of a sigma
    table's entries, and its exp, log and expm1 stray as far. Our schedules compute these
    correctly rounded (``schedulers.base.rounded``), which is what torch gives on the CPUs where
    they are bit for bit diffusers'. The scheduler tests run the reference so on every CPU: each
    float32 result rounded once from float64's."""
    def rounded(original):
        def call(x, *args, **kwargs):
            if args or kwargs or not (isinstance(x, torch.Tensor) and x.dtype == torch.float32):
                return original(x, *args, **kwargs)
            return original(x.double()).float()
        return call

    for name in ("sqrt", "exp", "log", "expm1"):
        monkeypatch.setattr(torch, name, rounded(getattr(torch, name)))
        monkeypatch.setattr(torch.Tensor, name, rounded(getattr(torch.Tensor, name)))
    root, power = rounded(torch.Tensor.sqrt), torch.Tensor.__pow__
    monkeypatch.setattr(torch.Tensor, "__pow__", lambda x, e: root(x) if isinstance(e, float) and e == 0.5 else power(x, e))
