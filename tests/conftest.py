"""Shared by both tiers. tests/unit/ needs MLX only (it runs without torch installed);
tests/parity/ compares against diffusers / transformers computed in the same run."""

import os

# Exact float32 matmuls on MLX's CUDA backend too (TF32 would make the 1e-4 bound meaningless).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# Under pytest-xdist each worker takes its share of the cores: two workers running two BLAS and two
# torch threads each on two cores wait on each other's spinning threads (the parity tests ran 2-3x
# slower so). Read by OpenBLAS as ``import mlx_unet`` loads it; torch's threads follow it in the
# parity tier, and the full-size tests take every core (parity/conftest.py). Set in the workers only:
# they inherit the main process's environment, which must stay as the user left it.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(share))

import mlx_unet  # noqa: E402  (first, so the optimised BLAS is loaded before mlx)
import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from axes import CODE_PATHS  # noqa: E402


@pytest.fixture(params=list(CODE_PATHS))
def code_path(request, monkeypatch):
    """Run the test on both code paths: with the CPU kernels swapped in, and as plain MLX (the
    code Metal and CUDA run, executed here on the CPU), through ``MLX_UNET_CPU_KERNELS``, which
    every loader (``cpu.prepare``) reads. Off the CPU only the plain path exists by default."""
    monkeypatch.setenv(mlx_unet.cpu.ENV_SWITCH, CODE_PATHS[request.param])
    return request.param


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test's own conversion cache (``$MLX_UNET_CACHE``): no test reads or fills the user's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MLX_UNET_CACHE", str(root))
    return root


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests marked ``cpu_only`` assert what only the CPU backend does: skipped elsewhere.

    Each module is one ``xdist_group`` unless its tests name another: under ``--dist loadgroup``
    a test without one goes to either worker on its own, and both workers then build the module's
    fixtures (converted pipelines, reference models and images)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    if mx.default_device() != mx.cpu:
        skip = pytest.mark.skip(reason="asserts the CPU backend's behaviour; this device is not the CPU")
        for item in items:
            if "cpu_only" in item.keywords:
                item.add_marker(skip)
